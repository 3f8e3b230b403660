"""`scanrestore watch`: the daemon on the configured folders, under systemd or by hand."""

from __future__ import annotations

import argparse

from daemon.cli.base import EXIT_FAILED, chain_path, log
from daemon.config import Config, ConfigError, model_store
from pipeline.chain import ChainConfigError

__all__ = ["register"]


def register(commands: argparse._SubParsersAction) -> None:
    watch = commands.add_parser("watch", help="run the daemon on the configured folders")
    watch.add_argument("--once", action="store_true", help="process what is there, then exit")
    watch.add_argument("--preset", help="a named chain instead of pipeline.stages")
    watch.set_defaults(handler=_watch)


def _watch(args: argparse.Namespace, config: Config) -> int:
    from daemon import systemd
    from daemon.service import Daemon, DaemonError

    # A config or chain problem must not be restarted in a loop by systemd.
    try:
        chain = config.chain(args.preset)
        chain.check_models(model_store(config), path=chain_path(config, args))
    except ChainConfigError as exc:
        for line in exc.problems:
            log.error("config %s", line)
        return systemd.EXIT_CONFIG
    daemon = Daemon(config, preset=args.preset, once=args.once, notify=systemd.notify)
    daemon.install_signal_handlers()
    watchdog = systemd.Watchdog.from_environment(daemon.healthy)
    if watchdog is not None:
        watchdog.start()
    try:
        code = daemon.run()
    except DaemonError as exc:
        log.error("cannot start: %s", exc)
        return systemd.EXIT_CONFIG
    except (ChainConfigError, ConfigError) as exc:  # licence policy, C2PA key
        for line in exc.problems:
            log.error("cannot start: %s", line)
        return systemd.EXIT_CONFIG
    finally:
        if watchdog is not None:
            watchdog.stop()
    return code if not args.once or daemon.failures == 0 else EXIT_FAILED
