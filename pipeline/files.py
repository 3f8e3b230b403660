"""File primitives shared by both packages: hashing, durable writes, linking without replacing.

Every write that must survive a crash goes through here: bytes fsynced in a temporary file
beside the destination, then a rename or hard link, then the folder fsynced.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "fsync_dir",
    "fsync_file",
    "link_no_replace",
    "replace_durably",
    "sha256_file",
    "temp_beside",
    "write_atomically",
]

# Filesystems (some SMB/CIFS shares, FAT) that refuse hard links answer with one of these.
_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}
)


def sha256_file(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> str:
    """The hex SHA-256 of a file. With `follow_symlinks` False a symlink is refused (OSError)
    rather than followed: for a file vetted as regular that may have been swapped since."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    with os.fdopen(os.open(path, flags), "rb", buffering=0) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or link durable by fsyncing the folder's entry. A no-op where the OS or
    filesystem refuses (some network shares cannot fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file written by someone else (an encoder, SQLite) to stable storage."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def link_no_replace(temp: str | os.PathLike[str], final: str | os.PathLike[str]) -> bool:
    """Give `temp` the name `final` unless `final` exists: True on success, False if taken.

    A hard link never replaces an existing file; `temp` keeps its own name and is the caller's
    to remove. Where hard links are refused (some shares) we fall back to an existence check
    plus rename, safe because one process owns the destination folder.
    """
    try:
        os.link(temp, final)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    if os.path.lexists(final):
        return False
    os.rename(temp, final)
    return True


@contextlib.contextmanager
def temp_beside(
    final: str | os.PathLike[str], tag: str = "part"
) -> Iterator[tuple[Path, IO[bytes]]]:
    """A new hidden temporary file in `final`'s folder (so the last rename is atomic), open for
    writing; removed on exit unless it was renamed away."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / f".{final.name}.{tag}-{secrets.token_hex(8)}"
    try:
        with open(temp, "xb") as handle:
            yield temp, handle
    finally:
        temp.unlink(missing_ok=True)


def replace_durably(handle: IO[bytes], temp: Path, final: Path) -> None:
    """Make the temporary file's bytes durable, then atomically give it its final name
    (replacing what was there) and make the rename durable."""
    handle.flush()
    os.fsync(handle.fileno())
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, final)
    fsync_dir(final.parent)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a reader sees the old or the new bytes, never a mix."""
    with temp_beside(path) as (temp, handle):
        handle.write(data)
        replace_durably(handle, temp, path)
