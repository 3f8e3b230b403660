"""`--once`: scan the watched folder, wait until what was found has settled, and return it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from daemon.fsinfo import is_network_filesystem
from daemon.seen import Version
from daemon.watcher.stability import Clock
from daemon.watcher.watching import ReadyFile, Refusal, Watcher

__all__ = ["OnceResult", "run_once"]


@dataclass(frozen=True)
class OnceResult:
    """What `run_once` found: files settled (in order), refused entries, paths still settling
    when it gave up (empty placeholders included), and whether the folder was there at all."""

    ready: list[ReadyFile]
    refused: list[Refusal]
    pending: list[str]
    available: bool


def run_once(
    root: str | os.PathLike[str],
    *,
    stable_seconds: float = 10.0,
    timeout_seconds: float = 300.0,
    patterns: Iterable[str] = (),
    exclude: Iterable[str | os.PathLike[str]] = (),
    known: Mapping[str, tuple[int, int, int]] | None = None,
    clock: Clock = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
    wall_clock: Clock = time.time,
    logger: logging.Logger | None = None,
) -> OnceResult:
    """Scan once and wait (at most `timeout_seconds`) until the files found have settled; files
    arriving meanwhile are left for the next run. Empty placeholders are not waited for.

    On a local disk, the time a file had already been quiet when the scan found it counts
    toward its settling (see `_count_quiet_time`): scans that were copied in before the run
    are not waited for again."""
    ready: list[ReadyFile] = []
    refused: list[Refusal] = []
    watcher = Watcher(
        root,
        ready.append,
        refused.append,
        stable_seconds=stable_seconds,
        rescan_seconds=None,
        patterns=patterns,
        exclude=exclude,
        known=known,
        clock=clock,
        logger=logger,
    )
    deadline = clock() + timeout_seconds
    watcher.step()
    if watcher.available and not is_network_filesystem(root):
        _count_quiet_time(watcher, root, wall_clock())
        watcher.step()
    while watcher.available and any(v.size for v in watcher.pending().values()):
        due = watcher.next_settle_at()
        now = clock()
        if now >= deadline:
            break
        sleep(max(0.0, min(deadline, due if due is not None else now) - now) or 0.01)
        watcher.step()
    return OnceResult(ready, refused, sorted(watcher.pending()), watcher.available)


def _count_quiet_time(watcher: Watcher, root: str | os.PathLike[str], now: float) -> None:
    """Count the time each file found had been quiet before the scan toward its settling.

    A file's inode change time (ctime) is set by this machine's kernel at every write, rename
    and change of attributes, and no program can set it (copies that keep the original mtime
    still get a new ctime). A file on a local disk whose ctime lies the delay or more in the
    past has not changed for that long: the wait would ask the same question of the next
    seconds instead. Without events (`--once` has no observer) the wait is only that second
    look, and a writer that resumes later is still caught: the worker refuses a source that
    changed while it was processed. Not on a network filesystem, where the server's clock
    sets the time and may run behind this one."""
    for relative, version in watcher.pending().items():
        try:
            info = os.lstat(os.path.join(root, relative))
        except OSError:
            continue  # gone or unreadable: the next step finds out
        if Version.of(info) == version and version.size:
            watcher.quiet_before(relative, version, now - info.st_ctime)
