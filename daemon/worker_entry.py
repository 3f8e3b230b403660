"""A worker process's first code: it ties the child's life to the daemon's before anything heavy
is imported, then hands over to daemon.worker. Standard library only, on purpose: importing
numpy, torch and the pipeline takes seconds under load, and a daemon killed meanwhile must not
leave a worker behind."""

from __future__ import annotations

import logging
import os
import signal
from multiprocessing.connection import Connection

__all__ = ["die_with_parent", "main"]

_PR_SET_PDEATHSIG = 1
PARENT_GONE = 3  # the exit status of a child whose parent died before the signal was armed


def die_with_parent(parent: int) -> None:
    """A worker must not outlive a killed daemon: it would go on writing files the restarted
    daemon has already cleaned up. Linux's parent-death signal kills it with the parent; if the
    parent died before the signal was armed, the child was already handed to another process
    and exits now."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: the closed pipe still ends the worker after its current image
    if os.getppid() != parent:
        os._exit(PARENT_GONE)


def main(conn: Connection, parent: int) -> None:
    """The spawn target. Once tied to its parent, the child makes its heavy imports, then reads
    its settings, a daemon.worker.WorkerSettings, as the first message on `conn`: a
    child started before the daemon knew its settings (daemon.prewarm) has its imports done by
    the time they come. End-of-file instead (a child never adopted) ends it quietly."""
    die_with_parent(parent)
    # The parent handles SIGINT/SIGTERM and tells children when to stop; a Ctrl-C while the
    # imports below run must not print a traceback from every worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from daemon.worker import serve

    try:
        settings = conn.recv()
    except (EOFError, OSError):
        os._exit(0)
    serve(conn, settings)
    # Every result was sent and every file it wrote is fsynced: the interpreter's teardown of
    # torch and the engines (about a second, which the daemon's stop would wait for) is
    # skipped, after the logs are flushed.
    logging.shutdown()
    os._exit(0)
