"""What monitoring and the dashboard count in the provenance tables: totals of files taken in,
done, failed, duplicated, quarantined and of worker deaths, fixity mismatches and the last
output, and the stage timings and throughput of recent runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from daemon.store.connection import path_from_db, timestamp
from daemon.store.fixity import FIXITY_MISMATCH
from daemon.store.provenance import Provenance

__all__ = ["StageTiming", "Tallies", "Totals"]


@dataclass(frozen=True)
class Totals:
    """Counts since the database was made (every one only ever grows)."""

    ingested: int  # file versions hashed and recorded (source_paths rows with bytes)
    done: int  # runs that published outputs
    failed: int  # runs that failed
    died: int  # runs whose worker died
    duplicates: int  # files linked to the outputs of the same bytes under another name
    fixity_mismatches: int
    quarantined: int  # quarantines (events: a retry releases the job, the count stays)
    last_output_at: datetime | None


@dataclass(frozen=True)
class StageTiming:
    """One stage of one finished run: its time, its model and the run's input size."""

    run_id: int
    finished_at: datetime
    stage: str
    model: str | None
    seconds: float
    input_megapixels: float | None  # None where the run recorded no size


class Tallies(Provenance):
    def totals(self) -> Totals:
        row = self.conn.execute(
            "SELECT "
            "(SELECT count(*) FROM source_paths WHERE source_sha256 IS NOT NULL), "
            "(SELECT count(*) FROM runs WHERE status = 'done'), "
            "(SELECT count(*) FROM runs WHERE status = 'failed'), "
            "(SELECT count(*) FROM runs WHERE status = 'died'), "
            "(SELECT count(*) FROM events WHERE kind = 'duplicate'), "
            "(SELECT count(*) FROM events WHERE kind = ?), "
            "(SELECT count(*) FROM events WHERE kind = 'quarantined'), "
            "(SELECT max(finished_at) FROM runs WHERE status = 'done')",
            (FIXITY_MISMATCH,),
        ).fetchone()
        last = None if row[7] is None else datetime.fromisoformat(row[7])
        return Totals(*row[:7], last_output_at=last)

    def stage_timings(self, since: datetime | None = None) -> list[StageTiming]:
        """Every stage that ran in a done run (finished at or after `since`), oldest first.
        The input size comes from the run's resizing stage (output size over scale squared)."""
        rows = self.conn.execute(
            "SELECT r.id, r.finished_at, s.stage, s.model_id, s.seconds, s.params_json, s.skipped "
            "FROM stage_runs s JOIN runs r ON r.id = s.run_id "
            "WHERE r.status = 'done' AND r.finished_at >= ? ORDER BY r.id, s.position",
            (timestamp(since) if since else "",),
        ).fetchall()
        sizes: dict[int, float] = {}
        for run_id, _at, _stage, _model, _seconds, params_json, _skipped in rows:
            params = json.loads(params_json)
            size, scale = params.get("output_size"), params.get("scale")
            if run_id not in sizes and size and scale:
                sizes[run_id] = size[0] * size[1] / float(scale) ** 2 / 1e6
        return [
            StageTiming(
                run_id, datetime.fromisoformat(at), stage, model, seconds, sizes.get(run_id)
            )
            for run_id, at, stage, model, seconds, _params, skipped in rows
            if skipped is None
        ]

    def done_since(self, since: datetime) -> list[tuple[datetime, str]]:
        """(finished_at, source path) of every done run finished at or after `since`."""
        rows = self.conn.execute(
            "SELECT finished_at, path FROM runs WHERE status = 'done' AND finished_at >= ? "
            "ORDER BY finished_at",
            (timestamp(since),),
        )
        return [(datetime.fromisoformat(at), path_from_db(path)) for at, path in rows]

    def models_in_use(self, recipe_sha256: str | None = None) -> dict[str, str]:
        """Model reference -> SHA-256 of the given recipe (by default the latest one used)."""
        if recipe_sha256 is None:
            row = self.conn.execute(
                "SELECT recipe_json FROM recipes ORDER BY first_used_at DESC, rowid DESC LIMIT 1"
            ).fetchone()
        else:
            row = self.conn.execute(
                "SELECT recipe_json FROM recipes WHERE recipe_sha256 = ?", (recipe_sha256,)
            ).fetchone()
        return dict(json.loads(row[0]).get("models", {})) if row else {}
