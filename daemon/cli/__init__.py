"""The `scanrestore` command line. Each module registers its own commands: process (one-shot
restoration), run (the daemon), state (status, history, retry, reprocess, quarantine), models,
export (PREMIS), web (serve, review), worker (a cluster worker on another machine)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from daemon import prewarm

__all__ = ["main", "program"]


def program() -> None:
    """The `scanrestore` program. `watch` starts its first worker process before `main`'s
    imports (torch and the pipeline, seconds), which it makes meanwhile (see daemon.prewarm).
    Once `main` has returned, every file, database and child process it used is closed, and
    what is left is the interpreter's teardown of torch, OpenVINO and the rest (1.1-1.3 s
    measured here): skipped, after the output and the logs are flushed (not under a profiler
    or coverage tool, which writes its results at the normal exit). A child started
    early and never adopted dies with this process (its parent-death signal)."""
    prewarm.start_for(sys.argv[1:])
    try:
        code = main()
    except SystemExit as exc:  # argparse's usage errors and --help
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    if sys.gettrace() is not None or sys.getprofile() is not None:
        prewarm.discard()  # the normal exit joins child processes: none may be left waiting
        sys.exit(code)  # a profiler or coverage tool writes its results at the normal exit
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`)
            stream.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    from daemon.actions import ActionError
    from daemon.cli.base import EXIT_CONFIG, EXIT_FAILED
    from daemon.config import ConfigError, load_config
    from daemon.logs import log_to_stderr
    from pipeline.chain import ChainConfigError
    from pipeline.errors import ModelError

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
    from daemon.cli import export, models, process, run, state, web, worker

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
    program()
