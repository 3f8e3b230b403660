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
from daemon.store.migrations import MIGRATIONS, Migration, script
from daemon.store.provenance import (
    PROVENANCE_TABLES,
    Event,
    Observation,
    OutputFile,
    Provenance,
    RunRecord,
    StageRun,
)
from daemon.store.store import Store, open_database

__all__ = [
    "FIXITY_AUDIT",
    "FIXITY_MISMATCH",
    "FIXITY_MISSING",
    "FIXITY_PROBLEMS",
    "FIXITY_UNREADABLE",
    "MIGRATIONS",
    "PROVENANCE_TABLES",
    "Backup",
    "BackupExistsError",
    "Clock",
    "Connection",
    "Event",
    "Fixity",
    "FixityItem",
    "FixityReport",
    "Migration",
    "Observation",
    "OutputFile",
    "Provenance",
    "RunRecord",
    "SchemaTooNewError",
    "StageRun",
    "Store",
    "StoreError",
    "UnknownReferenceError",
    "canonical_json",
    "db_path",
    "from_timestamp",
    "open_database",
    "path_from_db",
    "recipe_sha256",
    "script",
    "timestamp",
    "utc_now",
]
