"""What the `scanrestore` commands share: exit codes, the daemon's state opened read-write,
a path as the daemon records it, and where a chain came from (for error messages)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.config import Config
from pipeline.chain import ChainConfigError

if TYPE_CHECKING:
    from daemon.queue import JobQueue
    from daemon.store import Store

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "chain_path",
    "log",
    "open_state",
    "relative_to_watched",
]

log = logging.getLogger("scanrestore")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def open_state(config: Config) -> tuple[Store, JobQueue]:
    from daemon.config import state_dir
    from daemon.queue import JobQueue
    from daemon.store import open_database

    store = open_database(state_dir(config) / "scanrestore.db")
    return store, JobQueue(store, lease_seconds=config.daemon.lease_seconds)


def relative_to_watched(config: Config, path: Path) -> str:
    """A source path as the daemon records it: relative to the watched folder."""
    root = Path(config.watch.input).expanduser().resolve()
    candidate = path if path.is_absolute() else Path.cwd() / path
    if not path.is_absolute() and not candidate.exists() and not str(path).startswith(".."):
        return path.as_posix()  # already relative to the watched folder
    try:
        return Path(os.path.abspath(candidate)).relative_to(root).as_posix()
    except ValueError:
        raise ChainConfigError([f"{path}: not inside the watched folder {root}"]) from None


def chain_path(config: Config, args: argparse.Namespace) -> str:
    if getattr(args, "chain", None) is not None:
        return "--chain"
    preset = args.preset or config.pipeline.preset
    return f"presets.{preset}" if preset else "pipeline.stages"
