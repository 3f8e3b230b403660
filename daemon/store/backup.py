"""Backup: a consistent copy of the live database, linked into place, never overwriting."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from daemon.store.connection import Connection
from daemon.store.errors import BackupExistsError, StoreError
from pipeline.files import fsync_dir, fsync_file, link_no_replace

__all__ = ["Backup"]


class Backup(Connection):
    """Copies of the database file, taken while the daemon runs."""

    def backup(self, dest: str | os.PathLike[str]) -> Path:
        """A consistent copy with VACUUM INTO, written beside `dest` and then linked into
        place, so `dest` is either a complete database or absent; never overwritten."""
        dest = Path(dest)
        if dest.exists():
            raise BackupExistsError(dest)
        if self.conn.in_transaction:
            raise StoreError("backup cannot run inside a transaction (VACUUM INTO)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        from daemon.publish import TEMP_MARKER  # daemon.publish imports this package

        temp = dest.parent / f"._{dest.name}{TEMP_MARKER}{secrets.token_hex(4)}"
        try:
            self.conn.execute("VACUUM INTO ?", (str(temp),))
            fsync_file(temp)
            if not link_no_replace(temp, dest):
                raise BackupExistsError(dest)
            fsync_dir(dest.parent)
        finally:
            temp.unlink(missing_ok=True)
        return dest
