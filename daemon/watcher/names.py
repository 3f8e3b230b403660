"""File names: which ones the watcher never takes (dot files, partial downloads, NAS system
folders, the configured patterns) and how any name is written into one log line."""

from __future__ import annotations

import os
from collections.abc import Iterable
from fnmatch import fnmatchcase

from daemon.publish import TEMP_MARKER

__all__ = ["DEFAULT_IGNORED_NAMES", "DEFAULT_IGNORED_SUFFIXES", "IgnoreRules", "safe_name"]

# Compared case-insensitively: Windows and macOS clients write these names in any case.
DEFAULT_IGNORED_NAMES = frozenset(
    {
        "@eadir",  # Synology thumbnails
        "#recycle",  # Synology recycle bin: deleted files must not come back as new ones
        "#snapshot",
        "$recycle.bin",
        "system volume information",
        "lost+found",
        "thumbs.db",
        "desktop.ini",
    }
)
DEFAULT_IGNORED_SUFFIXES = (".part", ".tmp", "~")  # files still being written by their tools


def safe_name(path: str | bytes | os.PathLike[str]) -> str:
    """A file name fit for one log line: quoted, with control characters, quotes, backslashes
    and undecodable bytes escaped (a name may hold a newline or terminal escape codes)."""
    text = os.fsdecode(path)
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char in '\\"':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        elif code < 0x100:
            out.append(repr(char)[1:-1] if char in "\n\r\t" else f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


class IgnoreRules:
    """Names the watcher never takes: dot files (so macOS "._*", ".DS_Store" and our own
    temporary files), names ending in .part/.tmp/~, NAS system folders (@eaDir, #recycle ...),
    Thumbs.db, plus `patterns`.

    A pattern without "/" is a shell glob matched against every component of the relative path
    (so "raw" or "*.xmp" also ignore everything below a folder of that name); one with "/" is
    matched against the relative path and each of its parent folders ("old/2019*"). Matching is
    case-insensitive, as on the SMB shares scans arrive on.
    """

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        for pattern in self.patterns:
            if not isinstance(pattern, str) or not pattern.strip("/"):
                raise ValueError(f"ignore pattern {pattern!r}: must be a non-empty glob")
        self._name_patterns = tuple(p.casefold() for p in self.patterns if "/" not in p)
        self._path_patterns = tuple(p.strip("/").casefold() for p in self.patterns if "/" in p)

    def ignored(self, relative: str) -> bool:
        """True when `relative` (a "/"-separated path below the watched root) or any folder it
        lies in is ignored."""
        parts = relative.split("/")
        if any(self.ignored_name(part) for part in parts):
            return True
        if self._path_patterns:
            folded = [part.casefold() for part in parts]
            for end in range(1, len(folded) + 1):
                prefix = "/".join(folded[:end])
                if any(fnmatchcase(prefix, pattern) for pattern in self._path_patterns):
                    return True
        return False

    def ignored_name(self, name: str) -> bool:
        """True when a file or folder of this name is ignored wherever it is."""
        if name.startswith(".") or TEMP_MARKER in name:
            return True
        folded = name.casefold()
        if folded in DEFAULT_IGNORED_NAMES or folded.endswith(DEFAULT_IGNORED_SUFFIXES):
            return True
        return any(fnmatchcase(folded, pattern) for pattern in self._name_patterns)
