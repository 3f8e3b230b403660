"""How far a running job has got (its stage, tiles done of total), as a small JSON file per job
under the state folder: the worker keeps it current, the daemon removes it when the job ends,
and the review page's dashboard reads it. Nothing depends on it being there."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Progress", "ProgressWriter", "progress_path", "read_progress"]

FOLDER = "progress"


@dataclass(frozen=True)
class Progress:
    """JSON form: {"stage": str, "done": int, "total": int, "stages_done": int,
    "stages": int}; `done`/`total` count the current stage's tiles (0/0: not tiled)."""

    stage: str
    done: int
    total: int
    stages_done: int
    stages: int


def progress_path(state: Path, job_id: int) -> Path:
    return state / FOLDER / f"{int(job_id)}.json"


def read_progress(state: Path, job_id: int) -> Progress | None:
    try:
        data = json.loads(progress_path(state, job_id).read_text())
        return Progress(**{key: data[key] for key in Progress.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ProgressWriter:
    """The worker's side: `stage(name)` as each stage starts, `tiles(done, total)` as tiles
    finish (the StageContext's callbacks). Written at most every `interval` seconds, by
    replacing the file, so a reader never sees half of one."""

    def __init__(self, path: Path, stages: int, *, interval: float = 0.5) -> None:
        self.path = path
        self.interval = interval
        self._state = Progress("", 0, 0, 0, stages)
        self._started = -1
        self._written_at = float("-inf")

    def stage(self, name: str) -> None:
        self._started += 1
        self._state = Progress(name, 0, 0, self._started, self._state.stages)
        self._write(force=True)

    def tiles(self, done: int, total: int) -> None:
        s = self._state
        self._state = Progress(s.stage, done, total, s.stages_done, s.stages)
        self._write(force=done == total)

    def _write(self, *, force: bool) -> None:
        if not force and time.monotonic() - self._written_at < self.interval:
            return
        self._written_at = time.monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_suffix(f".{os.getpid()}.tmp")
            temp.write_text(json.dumps(asdict(self._state)))
            os.replace(temp, self.path)
        except OSError:
            pass  # progress is a courtesy: a full disk must not fail the image
