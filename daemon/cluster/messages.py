"""What crosses the broker, each a frozen dataclass with a documented JSON form: the task the
coordinator dispatches (RemoteTask), the result a worker reports (RemoteResult) and a worker's
heartbeat (Beat). Paths in tasks and results are always the coordinator's."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from daemon.publish import TEMP_MARKER, WrittenFile

__all__ = ["Beat", "RemoteResult", "RemoteTask", "ResultStatus"]

# ok: temporary outputs written; error: processing failed (retryable says whether worth
# another try); changed: the source is not the queued bytes; refused: this worker will not run
# the recipe (its weights differ); released: given back unprocessed (the worker is stopping).
ResultStatus = Literal["ok", "error", "changed", "refused", "released"]


@dataclass(frozen=True)
class RemoteTask:
    """One dispatched run. `run_token` is the fencing token: it names this dispatch only, and a
    result is accepted for exactly the token the coordinator is waiting on.

    JSON: {"run_token", "job_id", "path", "source", "source_sha256", "dest_dir", "stem",
    "recipe_sha256", "models": {ref: sha256}, "stages": [stage spec, ...], "precision",
    "seed", "output": {"format", "quality", "max_pixels", "mask"}, "software"}"""

    run_token: str
    job_id: int
    path: str  # relative to the watched folder: for logs and `status`
    source: str
    source_sha256: str
    dest_dir: str
    stem: str
    recipe_sha256: str
    models: dict[str, str]
    stages: list[dict[str, Any]]
    precision: str
    seed: int
    output: dict[str, Any]
    software: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RemoteTask:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class RemoteResult:
    """A worker's report on one RemoteTask; `files` are fsynced temporary files in the task's
    dest_dir (coordinator paths).

    JSON: {"run_token", "worker", "status", "error", "error_type", "retryable", "files":
    [{"kind", "temp", "suffix", "sha256", "bytes"}], "stages", "seconds", "device",
    "credentials"}"""

    run_token: str
    worker: str  # "NAME@HOST:PID", recorded in the run's provenance
    status: ResultStatus
    error: str | None = None
    error_type: str | None = None
    retryable: bool = True
    files: tuple[WrittenFile, ...] = ()
    stages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    device: str | None = None
    credentials: str | None = None  # C2PA: "c2pa" or why unsigned (the worker's own signing key)

    def to_json(self) -> str:
        data = asdict(self)
        data["files"] = [
            {
                "kind": item.kind,
                "temp": str(item.temp),
                "suffix": item.suffix,
                "sha256": item.sha256,
                "bytes": item.bytes,
            }
            for item in self.files
        ]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RemoteResult:
        data = json.loads(text)
        data["files"] = tuple(
            WrittenFile(
                item["kind"], Path(item["temp"]), item["suffix"], item["sha256"], item["bytes"]
            )
            for item in data["files"]
        )
        return cls(**data)

    def files_within(self, dest_dir: Path) -> bool:
        """Whether every file is a temporary file directly in `dest_dir`: a result naming any
        other path is never trusted with a link or a removal."""
        return all(
            item.temp.parent == dest_dir
            and item.temp.name.startswith("._")
            and TEMP_MARKER in item.temp.name
            for item in self.files
        )


@dataclass(frozen=True)
class Beat:
    """A worker's heartbeat, rewritten every `heartbeat_seconds`. `seq` grows with every beat:
    the coordinator judges liveness by seeing it change on its own clock, never by comparing
    the worker's clock with its own.

    JSON: {"name", "host", "pid", "device", "queue", "started_at", "seq", "run_token", "job",
    "done", "duplicates", "refusing": {recipe_sha256: error}, "error"}"""

    name: str
    host: str
    pid: int
    device: str
    queue: str
    started_at: str  # ISO-8601, the worker's clock
    seq: int = 0
    run_token: str | None = None  # the run it works on, None when idle
    job: str | None = None  # that run's path, relative to the watched folder
    done: int = 0  # runs it finished and reported
    duplicates: int = 0  # redelivered task messages it dropped (already claimed)
    refusing: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # its latest refusal or failure, for `status`

    @property
    def ident(self) -> str:
        return f"{self.name}@{self.host}:{self.pid}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Beat:
        return cls(**json.loads(text))
