"""Stability: a file is ready once its size, mtime and inode have stayed the same, with no event,
for a quiet period (paperless-ngx's StabilityTracker)."""

from __future__ import annotations

import time
from collections.abc import Callable

from daemon.seen import Version

__all__ = ["Clock", "StabilityTracker", "Version"]

Clock = Callable[[], float]


class _Entry:
    __slots__ = ("since", "version")

    def __init__(self, version: Version, since: float) -> None:
        self.version = version
        self.since = since


class StabilityTracker:
    """A file is ready once its size and mtime have stayed the same, with no event, for `delay`
    seconds of `clock` (monotonic, so a wall-clock jump neither rushes nor stalls it). An empty
    file is never ready: scanners create a 0-byte placeholder and fill it later."""

    def __init__(self, delay: float, clock: Clock = time.monotonic) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        self.delay = delay
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def observe(self, path: str, size: int, mtime_ns: int, inode: int = 0) -> bool:
        """Record the size, mtime and inode just seen; True (and the timer restarts) when they
        are new."""
        version = Version(size, mtime_ns, inode)
        entry = self._entries.get(path)
        if entry is not None and entry.version == version:
            return False
        self._entries[path] = _Entry(version, self._clock())
        return True

    def quiet_before(self, path: str, seconds: float) -> None:
        """`path` is known to have been quiet for `seconds` before it was first observed: count
        that time toward its delay (no-op for a path not tracked, or for seconds <= 0)."""
        entry = self._entries.get(path)
        if entry is not None and seconds > 0:
            entry.since -= min(seconds, self.delay)

    def touch(self, path: str) -> None:
        """An event for `path`: restart its timer (no-op for a path not tracked)."""
        entry = self._entries.get(path)
        if entry is not None:
            entry.since = self._clock()

    def forget(self, path: str) -> None:
        self._entries.pop(path, None)

    def version(self, path: str) -> Version | None:
        entry = self._entries.get(path)
        return entry.version if entry else None

    def ready(self) -> list[str]:
        """Non-empty paths quiet for at least the delay, sorted; they stay tracked until
        forgotten."""
        return self._quiet(empty=False)

    def waiting_empty(self) -> list[str]:
        """Empty paths quiet for the delay: placeholders worth checking again."""
        return self._quiet(empty=True)

    def next_due(self) -> float | None:
        """The clock time at which the next tracked path will have been quiet for the delay."""
        if not self._entries:
            return None
        return min(entry.since for entry in self._entries.values()) + self.delay

    def tracked(self) -> dict[str, Version]:
        """Every path being watched for stability, with the version last seen."""
        return {path: entry.version for path, entry in self._entries.items()}

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _quiet(self, *, empty: bool) -> list[str]:
        now = self._clock()
        return sorted(
            path
            for path, entry in self._entries.items()
            if (entry.version.size == 0) == empty and now - entry.since >= self.delay
        )
