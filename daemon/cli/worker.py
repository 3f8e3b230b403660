"""`scanrestore worker`: a cluster worker on this machine, taking the coordinator's jobs through
the configured broker (daemon.cluster.worker). One process per device."""

from __future__ import annotations

import argparse
import logging
import re

from daemon.cli.base import EXIT_CONFIG, log
from daemon.config import DEVICE_PATTERN, DEVICE_RULE, Config

__all__ = ["register"]


def register(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser(
        "worker", help="run jobs for a daemon on another machine (needs [cluster] broker)"
    )
    worker.add_argument(
        "--device",
        help="cpu, cuda, cuda:N, mps, vulkan or vulkan:N (default: the config's processing.device)",
    )
    worker.add_argument("--name", default="", help="this worker's name (default HOST-DEVICE-PID)")
    worker.set_defaults(handler=_worker)


def _worker(args: argparse.Namespace, config: Config) -> int:
    if not config.cluster.broker:
        log.error("config: cluster.broker: must name the Redis the daemon dispatches through")
        return EXIT_CONFIG
    device = args.device or config.processing.device
    if not re.fullmatch(DEVICE_PATTERN, device):
        log.error("--device: %s, got %r", DEVICE_RULE, device)
        return EXIT_CONFIG
    if args.name and not re.fullmatch(r"[A-Za-z0-9_.:-]+", args.name):
        log.error("--name: letters, digits and _ . : - only, got %r", args.name)
        return EXIT_CONFIG
    from daemon.cluster.worker import run_worker

    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    return run_worker(
        config, device=device, name=args.name, loglevel="INFO" if verbose else "WARNING"
    )
