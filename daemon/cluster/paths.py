"""The path map: how a worker sees the coordinator's folders on shared storage (as Tdarr and
Archivematica translate paths), one prefix rule each way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

__all__ = ["PathMap"]


@dataclass(frozen=True)
class PathMap:
    """Coordinator prefix -> worker prefix pairs. A path takes the longest prefix that matches
    it whole (a prefix "/volume1/scans" never matches "/volume1/scans2"); a path no prefix
    matches is the same on both machines."""

    pairs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, mapping: Mapping[str, str]) -> PathMap:
        pairs = ((_clean(source), _clean(target)) for source, target in mapping.items())
        return cls(tuple(sorted(pairs, key=lambda pair: -len(pair[0]))))

    def to_worker(self, path: str) -> str:
        """The coordinator's `path` as this worker sees it."""
        return _translate(path, self.pairs)

    def to_coordinator(self, path: str) -> str:
        """This worker's `path` as the coordinator sees it."""
        reverse = sorted(((t, s) for s, t in self.pairs), key=lambda pair: -len(pair[0]))
        return _translate(path, tuple(reverse))


def _clean(prefix: str) -> str:
    return str(PurePosixPath(prefix))


def _translate(path: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for source, target in pairs:
        if path == source:
            return target
        if path.startswith(source.rstrip("/") + "/"):
            return target.rstrip("/") + path[len(source.rstrip("/")) :]
    return path
