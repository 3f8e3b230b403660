"""The fixity audit: every original and output the database vouches for is hashed again;
each missing, unreadable or changed file becomes an event, and a summary closes the audit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from daemon.store.connection import path_from_db, timestamp
from daemon.store.provenance import Provenance
from daemon.store.records import Event
from pipeline.files import sha256_file

__all__ = [
    "FIXITY_AUDIT",
    "FIXITY_MISMATCH",
    "FIXITY_MISSING",
    "FIXITY_PROBLEMS",
    "FIXITY_UNREADABLE",
    "Fixity",
    "FixityItem",
    "FixityReport",
]

FIXITY_MISMATCH = "fixity_mismatch"
FIXITY_MISSING = "fixity_missing"
FIXITY_UNREADABLE = "fixity_unreadable"
FIXITY_AUDIT = "fixity_audit"  # one summary event per audit, written when it finishes
FIXITY_PROBLEMS = (FIXITY_MISMATCH, FIXITY_MISSING, FIXITY_UNREADABLE)


@dataclass(frozen=True)
class FixityItem:
    """A file whose bytes the database vouches for: an original (path relative to the watch
    root) or an output (path as recorded, relative to the output root)."""

    kind: Literal["original", "output"]
    path: str
    expected_sha256: str
    run_id: int | None = None


@dataclass(frozen=True)
class FixityReport:
    started_at: datetime
    finished_at: datetime
    checked: int
    problems: tuple[Event, ...]


class Fixity(Provenance):
    """The audit over the provenance tables: what to check, the check, the latest result."""

    def fixity_items(self) -> list[FixityItem]:
        """What the audit re-hashes: each path's latest original (unless it was recorded as
        removed) and every recorded output."""
        originals = self.conn.execute(
            "SELECT path, source_sha256 FROM source_paths p "
            "WHERE id = (SELECT max(id) FROM source_paths WHERE path = p.path) "
            "AND source_sha256 IS NOT NULL ORDER BY path"
        )
        outputs = self.conn.execute("SELECT path, output_sha256, run_id FROM outputs ORDER BY id")
        return [FixityItem("original", path_from_db(path), sha) for path, sha in originals] + [
            FixityItem("output", path_from_db(path), sha, run_id) for path, sha, run_id in outputs
        ]

    def audit_fixity(
        self,
        locate: Callable[[FixityItem], Path],
        *,
        hash_file: Callable[[Path], str] = sha256_file,
    ) -> FixityReport:
        """Re-hash every fixity item (`locate` maps it to a file); each missing, unreadable or
        changed file becomes an event, and a summary event closes the audit. No transaction
        is held while hashing, so the daemon keeps working during a long audit."""
        started_at = self.clock()
        items = self.fixity_items()
        problems = [
            event for item in items if (event := self._check(item, locate(item), hash_file))
        ]
        report = FixityReport(started_at, self.clock(), len(items), tuple(problems))
        self.record_event(
            FIXITY_AUDIT,
            detail={
                "started_at": timestamp(report.started_at),
                "checked": report.checked,
                "problems": len(problems),
            },
        )
        return report

    def _check(
        self, item: FixityItem, file: Path, hash_file: Callable[[Path], str]
    ) -> Event | None:
        detail: dict[str, Any] = {"item": item.kind, "file": str(file)}
        detail |= {"expected_sha256": item.expected_sha256, "run_id": item.run_id}
        try:
            actual = hash_file(file)
        except FileNotFoundError:
            return self.record_event(FIXITY_MISSING, path=item.path, detail=detail)
        except OSError as exc:
            detail["error"] = str(exc)
            return self.record_event(FIXITY_UNREADABLE, path=item.path, detail=detail)
        if actual == item.expected_sha256:
            return None
        detail["actual_sha256"] = actual
        return self.record_event(FIXITY_MISMATCH, path=item.path, detail=detail)

    def fixity_status(self) -> FixityReport | None:
        """The latest finished audit and the problems it found (for `scanrestore status`)."""
        summaries = self.events(kinds=[FIXITY_AUDIT], limit=1)
        if not summaries:
            return None
        summary = summaries[0]
        started = datetime.fromisoformat(summary.detail["started_at"])
        problems = self.events(kinds=FIXITY_PROBLEMS, since=started, until=summary.occurred_at)
        return FixityReport(
            started, summary.occurred_at, summary.detail["checked"], tuple(reversed(problems))
        )
