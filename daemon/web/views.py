"""What the page and the API show, read from the store and the queue: the status (queue, running
jobs, throughput, window, failures, fixity, models), the review list and one output with its
provenance. Plain JSON-ready values; handlers only serialise them."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import Config, model_store
from daemon.progress import read_progress
from daemon.queue import JobQueue
from daemon.schedule import ActiveHours
from daemon.store import (
    FIXITY_PROBLEMS,
    PublishedImage,
    Store,
    open_database,
    run_json,
    utc_now,
)
from daemon.web.previews import PreviewCache, PreviewError

__all__ = ["Site"]


@dataclass(frozen=True)
class Roots:
    input: Path
    output: Path
    state: Path


class Site:
    """The server's view of one daemon's state: one store and queue per thread (a sqlite3
    connection is not shared between threads; each lasts as long as its thread, i.e. the
    server process), the preview cache and the folders whose files are reached only through
    paths the store recorded."""

    def __init__(self, config: Config, roots: Roots) -> None:
        self.config = config
        self.roots = roots
        self.previews = PreviewCache(
            roots.state / "previews",
            max_bytes=config.web.preview_cache_mb * 1024 * 1024,
            max_pixels=config.image.max_pixels,
        )
        self._local = threading.local()
        self._shares: dict[str, float] = {}
        self._licences: dict[str, str] | None = None

    def state(self) -> tuple[Store, JobQueue]:
        store = getattr(self._local, "store", None)
        if store is None:
            store = open_database(self.roots.state / "scanrestore.db")
            self._local.store = store
            self._local.queue = JobQueue(store, lease_seconds=self.config.daemon.lease_seconds)
        return store, self._local.queue

    # ------------------------------------------------------------------ files by id

    def source_file(self, image: PublishedImage) -> Path:
        return _inside(self.roots.input, image.source_path)

    def output_file(self, relative: str) -> Path:
        return _inside(self.roots.output, relative)

    def invented_share(self, image: PublishedImage) -> float | None:
        """The share of the output's pixels a stage invented (from its mask), None if no mask."""
        if image.mask_path is None:
            return None
        store, _ = self.state()
        mask = next(
            (o for _, o in store.run_outputs(image.run_id) if o.kind == "mask"),
            None,
        )
        if mask is None:
            return None
        if mask.output_sha256 not in self._shares:
            try:
                share = self.previews.marked_share(self.output_file(mask.path))
            except PreviewError:
                return None
            self._shares[mask.output_sha256] = share
        return self._shares[mask.output_sha256]

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        store, queue = self.state()
        hours = ActiveHours.parse(self.config.schedule.active_hours)
        now = utc_now()
        fixity = store.fixity_status()
        done = store.done_since(now - timedelta(hours=24))
        per_hour = [0] * 24
        for at, _path in done:
            per_hour[min(23, int((now - at).total_seconds() // 3600))] += 1
        timings = store.stage_timings(now - timedelta(hours=24))
        seconds_per_mp = _seconds_per_megapixel(timings)
        running = []
        for job in queue.current():
            running.append(
                {
                    "job": job.id,
                    "path": job.path,
                    "since": job.heartbeat_at.isoformat() if job.heartbeat_at else None,
                    "attempt": job.attempts,
                    "progress": _progress(self.roots.state, job.id),
                }
            )
        return {
            "counts": dict(queue.counts()),
            "running": running,
            "files_per_hour": list(reversed(per_hour)),  # oldest hour first, this hour last
            "done_24h": len(done),
            "seconds_per_megapixel": seconds_per_mp,
            "window": {
                "always": hours.always,
                "open": hours.is_open(),
                "next_open": None if hours.always else hours.next_open().isoformat(),
                "active_hours": self.config.schedule.active_hours,
            },
            "recent_failures": [
                {
                    "job": job.id,
                    "path": job.path,
                    "state": job.state,
                    "error": job.last_error,
                    "attempts": job.attempts,
                }
                for job in queue.recent_failures(10)
            ],
            "quarantined": [
                {"job": job.id, "path": job.path, "reason": job.quarantine_reason}
                for job in queue.quarantined()
            ],
            "fixity": None
            if fixity is None
            else {
                "finished_at": fixity.finished_at.isoformat(),
                "checked": fixity.checked,
                "problems": [{"kind": e.kind, "path": e.path} for e in fixity.problems],
            },
            "models": self.models(store.models_in_use()),
            "reviews": store.review_counts(),
        }

    def models(self, models: dict[str, str]) -> list[dict[str, str]]:
        if self._licences is None:
            try:
                specs = model_store(self.config).specs()
            except OSError:
                specs = {}
            self._licences = {key: spec.licence for key, spec in specs.items()}
        return [
            {
                "model": ref,
                "sha256": sha,
                "licence": self._licences.get(ref, "unknown (a file given by path)"),
            }
            for ref, sha in sorted(models.items())
        ]

    # ------------------------------------------------------------------ review and outputs

    def listing(
        self,
        *,
        state: str | None,
        folder: str | None,
        preset: str | None,
        stage: str | None,
        sort: str,
    ) -> list[dict[str, Any]]:
        store, _ = self.state()
        images = store.published_images(state=state, folder=folder, preset=preset, stage=stage)  # type: ignore[arg-type]
        rows = [{**image.as_json(), "invented": self.invented_share(image)} for image in images]
        if sort == "invented":
            rows.sort(key=lambda row: (-(row["invented"] or 0.0), row["id"]))
        elif sort == "newest":
            rows.reverse()
        return rows

    def output(self, output_id: int) -> dict[str, Any] | None:
        store, queue = self.state()
        image = store.published_image(output_id)
        if image is None:
            return None
        run = store.run(image.run_id)
        files = store.run_outputs(image.run_id)
        problems = [
            {"kind": e.kind, "path": e.path, "at": e.occurred_at.isoformat(), **e.detail}
            for path in (image.path, image.source_path)
            for e in store.events(kinds=FIXITY_PROBLEMS, path=path, limit=5)
        ]
        fixity = store.fixity_status()
        size = _size(self, image)
        jobs = queue.jobs_for(image.source_path)
        return {
            **image.as_json(),
            "invented": self.invented_share(image),
            "size": size,
            "source_paths": store.paths_of(image.source_sha256),
            "run": run_json(run),
            "models": self.models(run.recipe.get("models", {})),
            "files": [
                {"id": i, "path": o.path, "kind": o.kind, "sha256": o.output_sha256}
                for i, o in files
            ],
            "reviews": [review.as_json() for review in store.reviews(output_id)],
            "other_versions": [other.as_json() for other in store.other_versions(image)],
            "fixity": {
                "last_audit": None if fixity is None else fixity.finished_at.isoformat(),
                "problems": problems,
            },
            "faces": _faces(run_json(run), size),
            "jobs": [
                {"job": j.id, "state": j.state, "reason": j.quarantine_reason or j.last_error}
                for j in jobs
            ],
            "presets": sorted(self.config.presets_all()),
        }


def _progress(state: Path, job_id: int) -> dict[str, Any] | None:
    found = read_progress(state, job_id)
    return None if found is None else asdict(found)


def _inside(root: Path, relative: str) -> Path:
    """A path the store recorded, under its root; never outside it."""
    path = (root / relative).resolve()
    if root.resolve() not in (path, *path.parents):
        raise PreviewError(f"{relative}: recorded path leaves {root}")
    return path


def _size(site: Site, image: PublishedImage) -> dict[str, list[int]] | None:
    from PIL import Image

    try:
        with Image.open(site.output_file(image.path)) as out:
            output = list(out.size)
        with Image.open(site.source_file(image)) as src:
            source = list(src.size)
    except (OSError, PreviewError):
        return None
    return {"output": output, "source": source}


def _faces(run: dict[str, Any], size: dict[str, list[int]] | None) -> list[dict[str, Any]]:
    """Faces a face stage restored, with its fidelity and each box in output pixels (a face
    stage before the upscale found them at the source's size)."""
    faces = []
    stages = run["stages"]
    for position, stage in enumerate(stages):
        if stage["stage"] != "face" or stage["skipped"] or size is None:
            continue
        later_resize = any(s["stage"] == "upscale" for s in stages[position + 1 :])
        scale = size["output"][0] / size["source"][0] if later_resize else 1.0
        params = stage["params"]
        for face in params.get("faces", []):
            x0, y0, x1, y1 = (max(0.0, v * scale) for v in face["box"])
            box = [int(x0), int(y0), max(1, int(x1 - x0)), max(1, int(y1 - y0))]
            faces.append({"box": box, "fidelity": params.get("fidelity")})
    return faces


def _seconds_per_megapixel(timings: list[Any]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str | None], list[float]] = {}
    for t in timings:
        if t.input_megapixels:
            groups.setdefault((t.stage, t.model), []).append(t.seconds / t.input_megapixels)
    return [
        {"stage": stage, "model": model, "runs": len(values), "median": float(np.median(values))}
        for (stage, model), values in sorted(groups.items(), key=lambda kv: str(kv[0]))
    ]
