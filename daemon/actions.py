"""What a curator or an operator asks of the daemon's state, the same from the command line and
from the web page: judge a published image, make a new version of a source, retry a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config
from daemon.queue import Enqueued, Job, JobQueue
from daemon.store import Decision, Review, Store

__all__ = ["ActionError", "Reprocessed", "reprocess", "retry", "review"]


class ActionError(Exception):
    """The request names nothing the store knows, or asks for something not allowed."""


@dataclass(frozen=True)
class Reprocessed:
    """A source queued again under a recipe (a new version will be made)."""

    path: str
    job_id: int
    created: bool
    recipe_sha256: str

    def as_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "job": self.job_id,
            "created": self.created,
            "recipe_sha256": self.recipe_sha256,
        }


def review(
    store: Store, output_id: int, decision: Decision, *, reviewer: str, note: str = ""
) -> Review:
    """Record a decision on a published image (an append-only review event)."""
    return store.record_review(output_id, decision, reviewer=reviewer, note=note)


def reprocess(
    config: Config, store: Store, queue: JobQueue, relative: str, preset: str | None = None
) -> Reprocessed:
    """Queue the source at `relative` (as the store records it, under the watched folder) for a
    new version under `preset` (or the configured chain). The file is hashed as it is now: the
    original is only read."""
    from daemon.processing import recipe_of
    from pipeline.files import sha256_file

    source = Path(config.watch.input).expanduser().resolve() / relative
    try:
        sha = sha256_file(source)
        size = source.stat().st_size
    except OSError as exc:
        raise ActionError(f"{relative}: cannot read the original: {exc.strerror}") from None
    chain = config.chain(preset)
    recipe = store.record_recipe(recipe_of(config, chain, preset))
    store.record_observation(relative, sha, size=size)
    queued: Enqueued = queue.enqueue(relative, sha, recipe, force=True)
    return Reprocessed(relative, queued.job.id, queued.created, recipe)


def retry(queue: JobQueue, path: str | None = None, *, all_failed: bool = False) -> list[Job]:
    """Queue failed or quarantined files again (one path, or every failed file)."""
    return queue.retry(path, all_failed=all_failed)
