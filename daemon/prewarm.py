"""Worker processes started before the command line's own imports (standard library only).

`scanrestore watch` imports torch and the pipeline in the daemon's process (about 3 s), and each
worker process imports them again before its first image (about 3 s more). Started here, by
`daemon.cli.program` before those imports, one worker process makes its imports while the
daemon makes its own; the daemon's WorkerPool then adopts it and sends it its settings, and
it starts on the first scan with its imports done. A child never adopted (the command failed,
or the daemon dispatches to cluster workers) reads end-of-file once this process exits, and
its parent-death signal ends it if this process is killed."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from daemon import worker_entry

__all__ = ["START_METHOD", "Started", "adopt", "discard", "start_for", "started"]

START_METHOD = "spawn"  # the worker pool's: a fork of a process holding threads is unsafe

Started = tuple[BaseProcess, Connection]

_started: list[Started] = []


def started(index: int) -> Started:
    """Start worker process `index`: it ties its life to this process, imports the pipeline,
    then waits for its settings on the returned connection (see worker_entry.main)."""
    ctx = multiprocessing.get_context(START_METHOD)
    parent, child = ctx.Pipe()
    process = ctx.Process(
        target=worker_entry.main, args=(child, os.getpid()), name=f"scanrestore-worker-{index}"
    )
    process.start()
    child.close()
    return process, parent


def start_for(argv: Sequence[str]) -> None:
    """For `watch` (options before it allowed), start one worker process now. Every other
    command starts none."""
    words = _positionals(argv)
    if words[:1] == ["watch"] and not _started:
        _started.append(started(0))


def adopt() -> Started | None:
    """A process started here and not yet adopted that is still alive, or None."""
    while _started:
        process, conn = _started.pop()
        if process.is_alive():
            return process, conn
        conn.close()
    return None


def _positionals(argv: Sequence[str]) -> list[str]:
    """The words of `argv` that are not options or their values (`--config PATH`)."""
    words: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif not arg.startswith("-"):
            words.append(arg)
    return words


def discard() -> None:
    """Let every process started here and not adopted go: it reads end-of-file once its
    imports are done and exits (multiprocessing reaps it)."""
    while _started:
        _process, conn = _started.pop()
        conn.close()
