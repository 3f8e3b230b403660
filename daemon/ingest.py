"""Ingest: files the watcher found settled are hashed, recorded as seen, and queued unless their
bytes were already done under the current recipe; refusals and unreadable files become events."""

from __future__ import annotations

import logging
import queue as threadqueue
import time
from datetime import datetime
from pathlib import Path

from daemon.config import Config
from daemon.logs import escape_controls
from daemon.queue import JobQueue
from daemon.seen import hash_if_seen, seen_versions
from daemon.store import Store
from daemon.watcher import ReadyFile, Refusal, Watcher, safe_name
from pipeline.files import sha256_file

__all__ = ["IngestError", "Intake"]

log = logging.getLogger("scanrestore.daemon")


class IngestError(Exception):
    """The watched folder cannot be read at all."""


class Intake:
    """Takes what the watcher hands over (through `ready`, a thread-safe queue) into the store
    and the job queue, on the loop's thread."""

    def __init__(
        self,
        config: Config,
        store: Store,
        queue: JobQueue,
        watcher: Watcher,
        ready: threadqueue.SimpleQueue[ReadyFile | Refusal],
        *,
        recipe_sha256: str,
        input_root: Path,
        exclude: tuple[Path, ...],
    ) -> None:
        self.config = config
        self.store = store
        self.queue = queue
        self.watcher = watcher
        self.ready = ready
        self.recipe_sha256 = recipe_sha256
        self.input = input_root
        self.exclude = exclude
        self._unreadable: dict[str, str] = {}  # path -> the error last recorded for it

    def scan_once(self) -> None:
        """`watch --once`: one pass over the tree; what is still changing is logged as waiting."""
        from daemon.watcher import run_once

        watch = self.config.watch
        result = run_once(
            self.input,
            stable_seconds=watch.stable_seconds,
            patterns=watch.ignore,
            exclude=self.exclude,
            known=seen_versions(self.store, self.queue, self.recipe_sha256),
        )
        for item in (*result.ready, *result.refused):
            self.ready.put(item)
        if not result.available:
            raise IngestError(f"{self.input}: the watched folder is unavailable")
        for path in result.pending:
            empty = (
                (self.input / path).stat().st_size == 0 if (self.input / path).exists() else False
            )
            reason = "empty (a placeholder still being written?)" if empty else "still changing"
            log.info("waiting path=%s reason=%s", safe_name(path), reason)
            self.store.record_event("waiting", path=path, detail={"reason": reason})

    def drain(self, seconds: float) -> None:
        """Take what is ready for about `seconds` (at least one file), so a burst is taken in
        slices between which the loop publishes, dispatches and renews leases."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                item = self.ready.get_nowait()
            except threadqueue.Empty:
                return
            if isinstance(item, Refusal):
                self._refuse(item)
            else:
                self._ingest(item)
            if time.monotonic() >= deadline:
                return

    def _refuse(self, item: Refusal) -> None:
        log.warning("refused path=%s reason=%s", safe_name(item.relative), item.reason)
        self.store.record_event("refused", path=item.relative, detail={"reason": item.reason})

    def _ingest(self, item: ReadyFile) -> None:
        """Hash a settled file (unless this version was hashed already), record it, queue it
        unless these bytes were done already."""
        recorded = self.store.latest_observation(item.relative)
        try:
            sha = hash_if_seen(recorded, item.version) or sha256_file(
                item.path, follow_symlinks=False
            )
        except OSError as exc:
            if self._unreadable.get(item.relative) != str(exc):  # once, not at every rescan
                self._unreadable[item.relative] = str(exc)
                log.warning(
                    "unreadable path=%s error=%s",
                    safe_name(item.relative),
                    escape_controls(str(exc)),
                )
                detail = {"error": str(exc)}
                self.store.record_event("unreadable", path=item.relative, detail=detail)
            self.watcher.offer_again(item.relative)  # permissions get fixed: look again later
            return
        self._unreadable.pop(item.relative, None)
        modified = datetime.fromtimestamp(item.mtime_ns / 1e9).astimezone()
        self.store.record_observation(
            item.relative,
            sha,
            size=item.size,
            modified_at=modified,
            mtime_ns=item.mtime_ns,
            inode=item.inode,
        )
        queued = self.queue.enqueue(item.relative, sha, self.recipe_sha256)
        if queued.created:
            log.info("queued path=%s sha256=%s", safe_name(item.relative), sha[:12])
        elif queued.reason in ("done", "quarantined") and queued.job.path != item.relative:
            log.info(
                "duplicate path=%s of=%s state=%s",
                safe_name(item.relative),
                safe_name(queued.job.path),
                queued.reason,
            )
            self.store.record_event(
                "duplicate",
                path=item.relative,
                source_sha256=sha,
                detail={"same_bytes_as": queued.job.path, "job_id": queued.job.id},
            )
