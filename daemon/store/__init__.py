"""The daemon's SQLite database: the connection and its encoders, named migrations, the
append-only provenance tables, the fixity audit and backups (one module each)."""

from daemon.store.backup import Backup
from daemon.store.connection import (
    Clock,
    Connection,
    canonical_json,
    db_path,
    from_timestamp,
    path_from_db,
    recipe_sha256,
    timestamp,
    utc_now,
)
from daemon.store.errors import (
    BackupExistsError,
    SchemaTooNewError,
    StoreError,
    UnknownReferenceError,
)
from daemon.store.fixity import (
    FIXITY_AUDIT,
    FIXITY_MISMATCH,
    FIXITY_MISSING,
    FIXITY_PROBLEMS,
    FIXITY_UNREADABLE,
    Fixity,
    FixityItem,
    FixityReport,
)
from daemon.store.migrations import Migration, merge_histories, script
from daemon.store.provenance import PROVENANCE_TABLES, Provenance
from daemon.store.records import (
    Event,
    Observation,
    OutputFile,
    OutputKind,
    RunRecord,
    RunStatus,
    StageRun,
)
from daemon.store.review import (
    DECISIONS,
    REVIEW_STATES,
    Decision,
    PublishedImage,
    Review,
    ReviewState,
    run_json,
)
from daemon.store.store import Store, database_migrations, open_database

__all__ = [
    "DECISIONS",
    "FIXITY_AUDIT",
    "FIXITY_MISMATCH",
    "FIXITY_MISSING",
    "FIXITY_PROBLEMS",
    "FIXITY_UNREADABLE",
    "MIGRATIONS",
    "PROVENANCE_TABLES",
    "REVIEW_STATES",
    "Backup",
    "BackupExistsError",
    "Clock",
    "Connection",
    "Decision",
    "Event",
    "Fixity",
    "FixityItem",
    "FixityReport",
    "Migration",
    "Observation",
    "OutputFile",
    "OutputKind",
    "Provenance",
    "PublishedImage",
    "Review",
    "ReviewState",
    "RunRecord",
    "RunStatus",
    "SchemaTooNewError",
    "StageRun",
    "Store",
    "StoreError",
    "UnknownReferenceError",
    "canonical_json",
    "database_migrations",
    "db_path",
    "from_timestamp",
    "merge_histories",
    "open_database",
    "path_from_db",
    "recipe_sha256",
    "run_json",
    "script",
    "timestamp",
    "utc_now",
]


def __getattr__(name: str) -> object:
    # MIGRATIONS, the database's whole history, holds the queue's migrations, and daemon.queue
    # imports this package: it is built when first asked for.
    if name == "MIGRATIONS":
        return database_migrations()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
