"""The tree scan: one walk of the watched folder without following symlinks, regular files with
their versions, everything else refused with the reason, ignored names and excluded folders
skipped."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from daemon.seen import Version
from daemon.watcher.names import IgnoreRules

__all__ = ["ScanResult", "scan"]


@dataclass
class ScanResult:
    """One walk of the tree: regular files, refused entries and folders that could not be read,
    all keyed by "/"-separated paths relative to the root."""

    files: dict[str, Version] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)

    def covers(self, relative: str) -> bool:
        """False when `relative` lies in a folder this scan could not read (so its absence from
        `files` proves nothing)."""
        parent = relative
        while parent:
            if parent in self.unreadable:
                return False
            parent = parent.rpartition("/")[0]
        return True


def scan(
    root: str | os.PathLike[str],
    rules: IgnoreRules | None = None,
    *,
    exclude: Iterable[str | os.PathLike[str]] = (),
    under: str = "",
) -> ScanResult:
    """Walk `root` (or its subfolder `under`) without following symlinks.

    Regular files come back with their size and mtime; symlinks, FIFOs, sockets and devices are
    refused with the reason; ignored names and the `exclude` paths (absolute, e.g. an output
    folder inside the watched one) are skipped with everything below them. An unreadable root
    raises OSError; an unreadable subfolder is recorded and the walk goes on.
    """
    root = os.fspath(root)
    return walk(root, rules or IgnoreRules(), excluded_prefixes(root, exclude), under)


def walk(root: str, rules: IgnoreRules, excluded: tuple[str, ...], under: str) -> ScanResult:
    result = ScanResult()
    if under and (skipped(under, rules, excluded) or not is_real_dir(os.path.join(root, under))):
        return result
    stack = [under]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(os.path.join(root, folder) if folder else root) as listing:
                entries = list(listing)
        except (FileNotFoundError, NotADirectoryError):
            if not folder:
                raise
            continue  # removed while we walked
        except OSError as exc:
            if not folder:
                raise
            result.unreadable[folder] = error_reason(exc)
            continue
        for entry in entries:
            relative = f"{folder}/{entry.name}" if folder else entry.name
            if skipped(relative, rules, excluded):
                continue
            classify(entry, relative, stack, result)
    return result


def classify(entry: os.DirEntry[str], relative: str, stack: list[str], result: ScanResult) -> None:
    try:
        if entry.is_dir(follow_symlinks=False):
            stack.append(relative)
            return
        info = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        result.unreadable[relative] = error_reason(exc)
        return
    if stat.S_ISREG(info.st_mode):
        result.files[relative] = Version.of(info)
    else:
        result.refused[relative] = file_kind(info.st_mode)


def file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "named pipe (FIFO)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISDIR, "folder"),
    ):
        if test(mode):
            return f"not a regular file: {name}"
    return "not a regular file"


def error_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def excluded_prefixes(root: str, exclude: Iterable[str | os.PathLike[str]]) -> tuple[str, ...]:
    """The `exclude` paths that lie inside `root`, as relative paths."""
    prefixes = []
    for path in exclude:
        for candidate in {os.path.abspath(os.fspath(path)), os.path.realpath(os.fspath(path))}:
            relative = relative_to(root, candidate)
            if relative:
                prefixes.append(relative)
    return tuple(prefixes)


def relative_to(root: str, path: str) -> str | None:
    """`path` relative to `root` ("" for the root itself), or None when outside it."""
    if path == root:
        return ""
    prefix = root if root.endswith("/") else root + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


def skipped(relative: str, rules: IgnoreRules, excluded: tuple[str, ...]) -> bool:
    if any(relative == prefix or relative.startswith(prefix + "/") for prefix in excluded):
        return True
    return rules.ignored(relative)
