"""The watcher: finds files in the watched tree and hands each settled version over exactly once.
One module per concern: names (what is ignored, names in logs), stability, scan (one walk of
the tree), watching (the Watcher and its observers), once (`run_once`)."""

from daemon.watcher.names import (
    DEFAULT_IGNORED_NAMES,
    DEFAULT_IGNORED_SUFFIXES,
    IgnoreRules,
    safe_name,
)
from daemon.watcher.once import OnceResult, run_once
from daemon.watcher.scan import ScanResult, scan
from daemon.watcher.stability import StabilityTracker, Version
from daemon.watcher.watching import ReadyFile, Refusal, Watcher

__all__ = [
    "DEFAULT_IGNORED_NAMES",
    "DEFAULT_IGNORED_SUFFIXES",
    "IgnoreRules",
    "OnceResult",
    "ReadyFile",
    "Refusal",
    "ScanResult",
    "StabilityTracker",
    "Version",
    "Watcher",
    "run_once",
    "safe_name",
    "scan",
]
