"""The `scanrestore` command line. Each module registers its own commands: process (one-shot
restoration), run (the daemon), state (status, history, retry, reprocess, quarantine), models,
export (PREMIS), web (serve, review), worker (a cluster worker on another machine)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from daemon.actions import ActionError
from daemon.cli import export, models, process, run, state, web, worker
from daemon.cli.base import EXIT_CONFIG, EXIT_FAILED
from daemon.config import ConfigError, load_config
from daemon.logs import log_to_stderr
from pipeline.chain import ChainConfigError
from pipeline.errors import ModelError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    log_to_stderr(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # its job bookkeeping is noise
    try:
        config = load_config(args.config)
        return int(args.handler(args, config))
    except (ConfigError, ChainConfigError) as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except ActionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scanrestore", description="Restore scanned archival photographs."
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (process, run, state, models, export, web, worker):
        module.register(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
