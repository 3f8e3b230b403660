"""Publication of a run's files: temporary names, the versioning rule, the plan recorded in the
queue before any file is linked, linking without replacing, the provenance sidecar, and the
recovery of a publication that a crash cut short.

The protocol, for one run: every file is written and fsynced under a temporary name in its
destination folder (`temp_name`, marked by `TEMP_MARKER`); one fresh version number is chosen for
them all; the plan (temporary and final names, hashes) is recorded in the job's queue row; each
file is hard-linked to its final name, never replacing one; the run is recorded and the plan
cleared in one transaction. A crash at any point leaves either temporary files (removed at the
next start), or a recorded plan that `Publisher.recover` completes or rolls back, once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.queue import Job, JobQueue
from daemon.store import Clock, OutputFile, Store, canonical_json
from daemon.store.provenance import OutputKind
from pipeline.files import fsync_dir, fsync_file, link_no_replace, sha256_file

__all__ = [
    "TEMP_MARKER",
    "Plan",
    "PlannedFile",
    "PublicationError",
    "Publisher",
    "WrittenFile",
    "existing_versions",
    "finish_linking",
    "link_all",
    "next_version",
    "plan_files",
    "publish_files",
    "remove_stem_temps",
    "remove_stray_temps",
    "remove_written",
    "temp_name",
    "temp_prefix",
    "write_temp",
]

TEMP_MARKER = ".tmp-"  # temporary files are "._<name>.tmp-<random>"; watchers ignore them
_NAME_MAX = 255  # bytes in one file name, on every filesystem we write to
_LONG_STEM = _NAME_MAX - 40  # leaves room for "._", ".mask.png", the marker and the random part


# ---------------------------------------------------------------- names


def temp_prefix(stem: str) -> str:
    """How every temporary file of `stem` begins: "._<stem>.". A stem too long to take the
    suffix and marker within 255 bytes is replaced by its hash: only final names carry it."""
    if len(os.fsencode(stem)) > _LONG_STEM:
        return f"._{hashlib.sha256(os.fsencode(stem)).hexdigest()[:32]}."
    return f"._{stem}."


def temp_name(stem: str, suffix: str) -> str:
    """A fresh temporary file name for `<stem><suffix>` (suffix with its leading dot)."""
    return f"{temp_prefix(stem)}{suffix.removeprefix('.')}{TEMP_MARKER}{secrets.token_hex(4)}"


def existing_versions(directory: Path, stem: str) -> set[int]:
    """Version numbers already taken by `stem` in `directory`, whatever their suffix."""
    pattern = re.compile(re.escape(stem) + r"\.v(\d+)\.[^.]+")
    taken = set()
    if directory.is_dir():
        for entry in os.scandir(directory):
            match = pattern.fullmatch(entry.name)
            if match:
                taken.add(int(match.group(1)))
    return taken


def next_version(
    directory: Path, stem: str, suffixes: Iterable[str], recorded: Iterable[int] = ()
) -> int:
    """The versioning rule: one more than any version of `stem` in `directory` (whatever its
    suffix) or `recorded` in the database, and free under every suffix to be published, so a
    number is never reused even when its files were deleted."""
    number = max(existing_versions(directory, stem) | set(recorded), default=0) + 1
    suffixes = list(suffixes)
    while any((directory / f"{stem}.v{number}{suffix}").exists() for suffix in suffixes):
        number += 1
    return number


# ---------------------------------------------------------------- files and plans


@dataclass(frozen=True)
class WrittenFile:
    """A file a run made, fsynced under a temporary name in its destination folder and not yet
    published. JSON: {"kind", "temp", "suffix", "sha256", "bytes"}."""

    kind: OutputKind
    temp: Path
    suffix: str  # with its leading dot: ".png", ".mask.png", ".json"
    sha256: str
    bytes: int


def write_temp(
    directory: Path, stem: str, kind: OutputKind, suffix: str, write: Callable[[Path], object]
) -> WrittenFile:
    """Write a file of `stem` through `write(temp_path)` under a fresh temporary name in
    `directory`, fsync it and hash it. Nothing is left behind when writing fails."""
    temp = directory / temp_name(stem, suffix)
    try:
        write(temp)
        fsync_file(temp)
        return WrittenFile(kind, temp, suffix, sha256_file(temp), temp.stat().st_size)
    except BaseException:
        with contextlib.suppress(OSError):  # the write's own error is the one to report
            temp.unlink(missing_ok=True)
        raise


def remove_written(files: Iterable[WrittenFile | PlannedFile]) -> None:
    """Drop the temporary files of a run that will not be published."""
    for item in files:
        with contextlib.suppress(OSError):  # a cleanup must never end a worker or the loop
            item.temp.unlink(missing_ok=True)


@dataclass(frozen=True)
class PlannedFile:
    """A written file and the name it is published under: `final` (absolute) and `relative`
    (to the output root, as the store records it), at `version`."""

    kind: OutputKind
    temp: Path
    suffix: str
    sha256: str
    bytes: int
    final: Path
    relative: str
    version: int

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "temp": str(self.temp),
            "suffix": self.suffix,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "final": str(self.final),
            "relative": self.relative,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> PlannedFile:
        return cls(
            kind=item["kind"],
            temp=Path(item["temp"]),
            suffix=item["suffix"],
            sha256=item["sha256"],
            bytes=int(item["bytes"]),
            final=Path(item["final"]),
            relative=item["relative"],
            version=int(item["version"]),
        )


def plan_files(
    files: Iterable[WrittenFile], directory: Path, relative_dir: str, stem: str, version: int
) -> tuple[PlannedFile, ...]:
    """Each written file's final name, `<stem>.v<version><suffix>`, in `directory`."""
    return tuple(
        PlannedFile(
            item.kind,
            item.temp,
            item.suffix,
            item.sha256,
            item.bytes,
            final=directory / f"{stem}.v{version}{item.suffix}",
            relative=str(Path(relative_dir) / f"{stem}.v{version}{item.suffix}"),
            version=version,
        )
        for item in files
    )


@dataclass(frozen=True)
class Plan:
    """What a publication will do, recorded in the job's queue row before any file is linked:
    enough to finish it after a crash, or to recognise what it linked.

    JSON form (canonical: sorted keys, no spaces), the column `jobs.publishing`:
    {"device": str | null, "files": [{"bytes": int, "final": str, "kind": str,
    "relative": str, "sha256": str, "suffix": str, "temp": str, "version": int}, ...],
    "run_token": str, "stages": [StageRecord.as_dict() ...], "started_at": ISO-8601,
    "worker": str | null (absent in plans recorded before it existed)}
    """

    run_token: str  # the RunId written into the files
    started_at: datetime
    device: str | None
    stages: tuple[Mapping[str, Any], ...]
    files: tuple[PlannedFile, ...]
    worker: str | None = None

    @property
    def version(self) -> int:
        return self.files[0].version

    def to_json(self) -> str:
        return canonical_json(
            {
                "run_token": self.run_token,
                "started_at": self.started_at.isoformat(),
                "device": self.device,
                "stages": list(self.stages),
                "files": [item.to_json() for item in self.files],
                "worker": self.worker,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        return cls(
            run_token=data["run_token"],
            started_at=datetime.fromisoformat(data["started_at"]),
            device=data["device"],
            stages=tuple(data["stages"]),
            files=tuple(PlannedFile.from_json(item) for item in data["files"]),
            worker=data.get("worker"),
        )

    def outputs(self) -> tuple[OutputFile, ...]:
        return tuple(
            OutputFile(item.relative, item.version, item.sha256, item.bytes, item.kind)
            for item in self.files
        )


# ---------------------------------------------------------------- linking


def link_all(files: Sequence[PlannedFile]) -> None:
    """Give every file its final name, never replacing one (FileExistsError), make the links
    durable, then drop the temporary names. When any step fails, the names this call linked are
    removed again before the error propagates, and the temporary files are left to the caller:
    nothing of the run stays published."""
    linked: list[Path] = []
    try:
        for item in files:
            if not link_no_replace(item.temp, item.final):
                raise FileExistsError(f"{item.final}: exists; refusing to overwrite")
            linked.append(item.final)
        for directory in {item.final.parent for item in files}:
            fsync_dir(directory)
    except BaseException:
        for final in linked:
            with contextlib.suppress(OSError):
                final.unlink()
        raise
    remove_written(files)


def publish_files(
    directory: Path, stem: str, files: Sequence[WrittenFile]
) -> tuple[PlannedFile, ...]:
    """Publish written files together at the next free version, without a database (the
    one-shot CLI): a name taken meanwhile moves them all on to the next version. On failure
    the temporary files are removed and nothing is left published."""
    version = next_version(directory, stem, [item.suffix for item in files])
    try:
        while True:
            planned = plan_files(files, directory, ".", stem, version)
            try:
                link_all(planned)
                return planned
            except FileExistsError:
                version += 1
    except BaseException:
        remove_written(files)
        raise


def finish_linking(files: Sequence[PlannedFile]) -> bool:
    """After a crash: link what a recorded plan had not linked yet. True when every final file
    now holds its planned bytes; otherwise (a temporary file gone or altered, a final name
    taken by other bytes) the files the plan did link are removed again and it is False.
    Temporary names are dropped either way."""
    complete = True
    for item in files:
        if item.final.exists():
            complete &= _holds(item.final, item.sha256)
        elif _holds(item.temp, item.sha256):
            complete &= link_no_replace(item.temp, item.final)
        else:
            complete = False
    if not complete:
        for item in files:  # ours: a fresh version's name holding the planned bytes
            if _holds(item.final, item.sha256):
                with contextlib.suppress(OSError):
                    item.final.unlink()
    for directory in {item.final.parent for item in files}:
        fsync_dir(directory)
    remove_written(files)
    return complete


def _holds(path: Path, sha256: str) -> bool:
    try:
        return sha256_file(path, follow_symlinks=False) == sha256
    except OSError:
        return False


def remove_stem_temps(directory: Path, stem: str) -> None:
    """Remove every temporary file of `stem` in `directory` (a worker that died mid-write)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.startswith(temp_prefix(stem)) and TEMP_MARKER in entry.name:
                Path(entry.path).unlink(missing_ok=True)


def remove_stray_temps(root: Path) -> int:
    """At start-up, after plans were finished: every temporary file left under `root`."""
    removed = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            if name.startswith("._") and TEMP_MARKER in name:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed


# ---------------------------------------------------------------- the daemon's publications


class PublicationError(Exception):
    """The filesystem cut a publication short (disk full, permissions, a share gone, a name
    too long): nothing of the run was left published. `cause` is the OSError."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class Finished:
    """A run whose files wait to be published: the worker's temporary files and report."""

    job: Job
    run_token: str
    started_at: datetime
    dest_dir: Path
    stem: str
    files: tuple[WrittenFile, ...]
    stages: tuple[Mapping[str, Any], ...]
    device: str | None
    credentials: str | None = None  # C2PA: "c2pa", or why the image is unsigned; None: off
    worker: str | None = None  # the process that made the files ("HOST:PID" or a cluster ident)


class Publisher:
    """Publishes finished runs under fresh versions and records them; at start-up, finishes
    or rolls back the publications a crash interrupted."""

    def __init__(
        self,
        store: Store,
        queue: JobQueue,
        *,
        code_version: str,
        provenance_sidecar: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.code_version = code_version
        self.provenance_sidecar = provenance_sidecar
        self._clock = clock or store.clock

    def publish(self, run: Finished) -> Plan:
        """Plan (recorded with a lease extension), link every file at one fresh version, then
        record the run and complete the job. PublicationError when the filesystem fails on the
        way: the plan is cleared and every file of the run removed; the job is the caller's."""
        written = list(run.files)
        try:
            version = self._next_version(run)
            if self.provenance_sidecar:
                written.append(self._sidecar(run, version))
            relative_dir = str(Path(run.job.path).parent)
            plan = Plan(
                run.run_token,
                run.started_at,
                run.device,
                run.stages,
                plan_files(written, run.dest_dir, relative_dir, run.stem, version),
                run.worker,
            )
            self.queue.record_plan(run.job, plan.to_json())
            link_all(plan.files)
        except OSError as exc:
            remove_written(written)
            self.queue.clear_plan(run.job)
            raise PublicationError(exc) from exc
        self._complete(run.job, plan)
        return plan

    def recover(self) -> list[Job]:
        """Finish every plan a crash left recorded; one whose files cannot all be linked is
        rolled back. Returns the jobs whose publication was finished (now done)."""
        finished = []
        for job, text in self.queue.pending_plans():
            plan = Plan.from_json(text)
            if finish_linking(plan.files):
                self._complete(job, plan)
                finished.append(job)
            else:
                self.queue.clear_plan(job)
        return finished

    def _complete(self, job: Job, plan: Plan) -> None:
        with self.store.transaction():
            self.store.record_run(
                source_sha256=job.source_sha256,
                path=job.path,
                recipe_sha256=job.recipe_sha256,
                status="done",
                started_at=plan.started_at,
                finished_at=self._clock(),
                code_version=self.code_version,
                device=plan.device,
                worker=plan.worker,
                job_id=job.id,
                run_token=plan.run_token,
                stages=plan.stages,
                outputs=plan.outputs(),
            )
            self.queue.clear_plan(job)
            self.queue.complete(job)

    def _next_version(self, run: Finished) -> int:
        """Never used by a file on disk nor by any recorded output of this stem."""
        stem_path = str(Path(run.job.path).parent / run.stem)
        suffixes = [item.suffix for item in run.files] + [".json"]
        recorded = self.store.recorded_versions(stem_path)
        return next_version(run.dest_dir, run.stem, suffixes, recorded)

    def _sidecar(self, run: Finished, version: int) -> WrittenFile:
        """The provenance JSON beside the outputs: source, recipe, stages, every file's hash."""
        document = {
            "run_id": run.run_token,  # the file format's name for the run token
            "source": {"path": run.job.path, "sha256": run.job.source_sha256},
            "recipe_sha256": run.job.recipe_sha256,
            "recipe": self.store.recipe(run.job.recipe_sha256),
            "version": version,
            "outputs": [
                {
                    "kind": item.kind,
                    "name": f"{run.stem}.v{version}{item.suffix}",
                    "sha256": item.sha256,
                    "bytes": item.bytes,
                }
                for item in run.files
            ],
            "stages": list(run.stages),
            "device": run.device,
            "worker": run.worker,
            "started_at": run.started_at.isoformat(),
            "code_version": self.code_version,
            # Curators' decisions on the earlier versions of this source, oldest first.
            "reviews": [
                review.as_json()
                for review in self.store.reviews_of_source(run.job.source_sha256, run.job.path)
            ],
        }
        if run.credentials is not None:  # C2PA signing is on: "c2pa", or why not signed
            document["content_credentials"] = run.credentials
        data = (json.dumps(document, indent=2, ensure_ascii=True) + "\n").encode()
        return write_temp(run.dest_dir, run.stem, "provenance", ".json", _bytes_writer(data))


def _bytes_writer(data: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(data)
