"""Curators' review decisions: the append-only `reviews` table (who judged which published image,
when, approved or rejected, with a note) and the catalogue of published images they judge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from daemon.store.connection import db_path, path_from_db
from daemon.store.errors import UnknownReferenceError
from daemon.store.migrations import Migration, script
from daemon.store.provenance import Provenance
from daemon.store.records import OutputFile, RunRecord

__all__ = [
    "DECISIONS",
    "REVIEW_MIGRATIONS",
    "REVIEW_STATES",
    "Decision",
    "PublishedImage",
    "Review",
    "ReviewState",
    "Reviews",
    "run_json",
]

Decision = Literal["approved", "rejected"]
ReviewState = Literal["awaiting", "approved", "rejected"]
DECISIONS: tuple[str, ...] = get_args(Decision)
REVIEW_STATES: tuple[str, ...] = get_args(ReviewState)

# One row per decision, never changed: a later decision on the same image is a new row, and the
# latest one is the image's state. Only published images (kind 'image') are judged.
_REVIEWS = """
CREATE TABLE reviews (
    id INTEGER PRIMARY KEY,
    output_id INTEGER NOT NULL REFERENCES outputs (id),
    decision TEXT NOT NULL CHECK (decision IN ('approved', 'rejected')),
    reviewer TEXT NOT NULL CHECK (length(reviewer) BETWEEN 1 AND 200),
    note TEXT NOT NULL CHECK (length(note) <= 4000),
    decided_at TEXT NOT NULL
) STRICT;
CREATE INDEX reviews_output ON reviews (output_id, id);
CREATE TRIGGER reviews_no_update BEFORE UPDATE ON reviews BEGIN
    SELECT RAISE(ABORT, 'reviews is append-only: UPDATE is not allowed'); END;
CREATE TRIGGER reviews_no_delete BEFORE DELETE ON reviews BEGIN
    SELECT RAISE(ABORT, 'reviews is append-only: DELETE is not allowed'); END;
"""

REVIEW_MIGRATIONS: tuple[Migration, ...] = (Migration("0005_reviews", script(_REVIEWS)),)

MAX_NOTE = 4000
MAX_REVIEWER = 200


@dataclass(frozen=True)
class Review:
    """One decision on one published image. JSON form: `as_json()`."""

    id: int
    output_id: int
    output_path: str
    decision: Decision
    reviewer: str
    note: str
    decided_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "output_id": self.output_id,
            "output": self.output_path,
            "decision": self.decision,
            "reviewer": self.reviewer,
            "note": self.note,
            "decided_at": self.decided_at.isoformat(),
        }


@dataclass(frozen=True)
class PublishedImage:
    """A published image as the review queue lists it: the image, the run that made it, the
    source it came from, the recipe's preset, the stages that ran, and its review state."""

    output_id: int
    path: str  # relative to the output root
    version: int
    output_sha256: str
    bytes: int
    run_id: int
    source_path: str  # relative to the watch root
    source_sha256: str
    preset: str | None
    stages: tuple[str, ...]  # stages that ran (skipped ones left out)
    finished_at: datetime
    state: ReviewState
    mask_path: str | None  # the run's invented-pixel mask, if one was written

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.output_id,
            "path": self.path,
            "version": self.version,
            "sha256": self.output_sha256,
            "bytes": self.bytes,
            "run": self.run_id,
            "source": {"path": self.source_path, "sha256": self.source_sha256},
            "preset": self.preset,
            "stages": list(self.stages),
            "finished_at": self.finished_at.isoformat(),
            "state": self.state,
            "mask": self.mask_path,
        }


_IMAGES = """
SELECT o.id, o.path, o.version, o.output_sha256, o.bytes, o.run_id, r.path AS source_path,
    r.source_sha256, r.finished_at, json_extract(c.recipe_json, '$.preset') AS preset,
    (SELECT group_concat(stage, ' ') FROM (SELECT stage FROM stage_runs s
        WHERE s.run_id = r.id AND s.skipped IS NULL ORDER BY position)) AS stages,
    (SELECT decision FROM reviews v WHERE v.output_id = o.id ORDER BY v.id DESC LIMIT 1)
        AS decision,
    (SELECT m.path FROM outputs m WHERE m.run_id = r.id AND m.kind = 'mask' LIMIT 1) AS mask
FROM outputs o JOIN runs r ON r.id = o.run_id JOIN recipes c USING (recipe_sha256)
WHERE o.kind = 'image'
"""


class Reviews(Provenance):
    """Recording decisions and reading them back, with the catalogue of published images."""

    def record_review(
        self, output_id: int, decision: Decision, *, reviewer: str, note: str = ""
    ) -> Review:
        """Append a decision on the published image `output_id`. UnknownReferenceError if no
        image has that id, ValueError for a decision, reviewer or note out of bounds."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
        if not 1 <= len(reviewer) <= MAX_REVIEWER:
            raise ValueError(f"reviewer must be 1 to {MAX_REVIEWER} characters")
        if len(note) > MAX_NOTE:
            raise ValueError(f"note must be at most {MAX_NOTE} characters")
        with self.transaction():
            if self.published_image(output_id) is None:
                raise UnknownReferenceError(f"outputs: no published image with id {output_id}")
            row_id = self.conn.execute(
                "INSERT INTO reviews (output_id, decision, reviewer, note, decided_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (output_id, decision, reviewer, note, self.now()),
            ).lastrowid
        return self._reviews("v.id = ?", (row_id,))[0]

    def reviews(self, output_id: int | None = None) -> list[Review]:
        """Decisions, oldest first: on one image, or on every image."""
        if output_id is None:
            return self._reviews("1", ())
        return self._reviews("v.output_id = ?", (output_id,))

    def reviews_of_source(self, source_sha256: str, path: str) -> list[Review]:
        """Decisions on every image made from these bytes or from this source path, oldest
        first: what a later version's provenance sidecar carries forward."""
        return self._reviews(
            "o.run_id IN (SELECT id FROM runs WHERE source_sha256 = ? OR path = ?)",
            (source_sha256, db_path(path)),
        )

    def review_counts(self) -> dict[str, int]:
        """Decisions recorded, by kind (every decision, not only the latest per image)."""
        rows = self.conn.execute("SELECT decision, count(*) FROM reviews GROUP BY decision")
        return {decision: 0 for decision in DECISIONS} | dict(rows.fetchall())

    def _reviews(self, where: str, params: Sequence[Any]) -> list[Review]:
        rows = self.db.query(
            "SELECT v.*, o.path AS output_path FROM reviews v JOIN outputs o ON o.id = v.output_id "
            f"WHERE {where} ORDER BY v.id",
            params,
        )
        return [
            Review(
                id=row["id"],
                output_id=row["output_id"],
                output_path=path_from_db(row["output_path"]),
                decision=row["decision"],
                reviewer=row["reviewer"],
                note=row["note"],
                decided_at=datetime.fromisoformat(row["decided_at"]),
            )
            for row in rows
        ]

    def published_image(self, output_id: int) -> PublishedImage | None:
        rows = self._images("o.id = ?", (output_id,))
        return rows[0] if rows else None

    def published_image_at(self, path: str) -> PublishedImage | None:
        """The published image recorded under `path` (relative to the output root)."""
        rows = self._images("o.path = ?", (db_path(path),))
        return rows[-1] if rows else None

    def latest_image_of(self, source_path: str) -> PublishedImage | None:
        """The newest image made from the source recorded at `source_path`."""
        rows = self._images("r.path = ?", (db_path(source_path),))
        return rows[-1] if rows else None

    def published_images(
        self,
        *,
        state: ReviewState | None = None,
        folder: str | None = None,
        preset: str | None = None,
        stage: str | None = None,
    ) -> list[PublishedImage]:
        """Published images, oldest first, filtered by review state, source folder (the path's
        folder or one below it), the recipe's preset and a stage that ran."""
        images = self._images("1", ())
        if folder:
            prefix = folder.strip("/") + "/"
            images = [i for i in images if i.source_path.startswith(prefix)]
        return [
            image
            for image in images
            if (state is None or image.state == state)
            and (preset is None or image.preset == preset)
            and (stage is None or stage in image.stages)
        ]

    def other_versions(self, image: PublishedImage) -> list[PublishedImage]:
        """Every other image made from the same bytes or the same source path."""
        rows = self._images(
            "(r.source_sha256 = ? OR r.path = ?) AND o.id != ?",
            (image.source_sha256, db_path(image.source_path), image.output_id),
        )
        return rows

    def run_outputs(self, run_id: int) -> list[tuple[int, OutputFile]]:
        """A run's published files with their ids."""
        return [
            (
                o["id"],
                OutputFile(
                    path_from_db(o["path"]), o["version"], o["output_sha256"], o["bytes"], o["kind"]
                ),
            )
            for o in self.db.query("SELECT * FROM outputs WHERE run_id = ? ORDER BY id", (run_id,))
        ]

    def _images(self, where: str, params: Sequence[Any]) -> list[PublishedImage]:
        rows = self.db.query(f"{_IMAGES} AND {where} ORDER BY o.id", params)
        return [_published(row) for row in rows]


def _published(row: Mapping[str, Any]) -> PublishedImage:
    return PublishedImage(
        output_id=row["id"],
        path=path_from_db(row["path"]),
        version=row["version"],
        output_sha256=row["output_sha256"],
        bytes=row["bytes"],
        run_id=row["run_id"],
        source_path=path_from_db(row["source_path"]),
        source_sha256=row["source_sha256"],
        preset=row["preset"],
        stages=tuple((row["stages"] or "").split()),
        finished_at=datetime.fromisoformat(row["finished_at"]),
        state=row["decision"] or "awaiting",
        mask_path=None if row["mask"] is None else path_from_db(row["mask"]),
    )


def run_json(run: RunRecord) -> dict[str, Any]:
    """A run as the API and `history --json` show it."""
    return {
        "run": run.id,
        "run_token": run.run_token,
        "path": run.path,
        "status": run.status,
        "source_sha256": run.source_sha256,
        "recipe_sha256": run.recipe_sha256,
        "recipe": run.recipe,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat(),
        "device": run.device,
        "code_version": run.code_version,
        "error": run.error,
        "stages": [
            {
                "stage": s.stage,
                "version": s.version,
                "model": s.model_id,
                "model_sha256": s.model_sha256,
                "params": s.params,
                "seconds": s.seconds,
                "skipped": s.skipped,
            }
            for s in run.stages
        ],
        "outputs": [
            {"path": o.path, "version": o.version, "sha256": o.output_sha256, "kind": o.kind}
            for o in run.outputs
        ],
    }
