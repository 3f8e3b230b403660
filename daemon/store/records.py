"""The provenance records as read back: observations, runs with their stages and outputs, events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

__all__ = ["Event", "Observation", "OutputFile", "OutputKind", "RunRecord", "RunStatus", "StageRun"]

RunStatus = Literal["done", "failed", "discarded", "died"]
OutputKind = Literal["image", "mask", "provenance"]


@dataclass(frozen=True)
class Observation:
    id: int
    path: str
    source_sha256: str | None  # None: the path was seen empty (the file went away)
    size: int | None
    modified_at: datetime | None
    seen_at: datetime
    mtime_ns: int | None = None  # None where not recorded (and in rows older than 0004)
    inode: int | None = None


@dataclass(frozen=True)
class StageRun:
    position: int
    stage: str
    version: int
    model_id: str | None
    model_sha256: str | None
    params: dict[str, Any]
    seconds: float
    device: str | None
    skipped: str | None


@dataclass(frozen=True)
class OutputFile:
    """A published file: its path as the daemon names it (relative to the output root)."""

    path: str
    version: int
    output_sha256: str
    bytes: int
    kind: OutputKind = "image"


@dataclass(frozen=True)
class RunRecord:
    id: int
    job_id: int | None
    source_sha256: str
    path: str
    recipe_sha256: str
    recipe: dict[str, Any]
    status: RunStatus
    started_at: datetime
    finished_at: datetime
    device: str | None
    code_version: str
    error: str | None
    stages: tuple[StageRun, ...]
    outputs: tuple[OutputFile, ...]
    run_token: str | None = None  # the RunId written into the output files
    worker: str | None = None  # the process that made it: "HOST:PID" or "NAME@HOST:PID"


@dataclass(frozen=True)
class Event:
    id: int
    occurred_at: datetime
    kind: str
    path: str | None
    source_sha256: str | None
    detail: dict[str, Any]
