"""`--once`: scan the watched folder, wait until what was found has settled, and return it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

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
    logger: logging.Logger | None = None,
) -> OnceResult:
    """Scan once and wait (at most `timeout_seconds`) until the files found have settled; files
    arriving meanwhile are left for the next run. Empty placeholders are not waited for."""
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
    while watcher.available and any(v.size for v in watcher.pending().values()):
        due = watcher.next_settle_at()
        now = clock()
        if now >= deadline:
            break
        sleep(max(0.0, min(deadline, due if due is not None else now) - now) or 0.01)
        watcher.step()
    return OnceResult(ready, refused, sorted(watcher.pending()), watcher.available)
