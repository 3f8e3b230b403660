"""The commands of the review page: serve (the page, API and metrics, in the foreground) and
review (a curator's decision on a published image, from the command line)."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
from pathlib import Path

from daemon.cli.base import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, open_state, relative_to_watched
from daemon.config import Config

__all__ = ["register"]


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve the review page, HTTP API and metrics")
    serve.add_argument("--host", help="address to bind (default: [web] host)")
    serve.add_argument("--port", type=int, help="port (default: [web] port)")
    serve.set_defaults(handler=_serve)
    review = commands.add_parser("review", help="approve or reject a published image")
    review.add_argument(
        "path", type=Path, metavar="PATH", help="an output image, or a source (its newest output)"
    )
    decision = review.add_mutually_exclusive_group(required=True)
    decision.add_argument("--approve", action="store_true")
    decision.add_argument("--reject", action="store_true")
    review.add_argument("--note", default="", help="why (shown with the decision)")
    review.add_argument("--by", help="who decides (default: the user name)")
    review.add_argument("--json", action="store_true")
    review.set_defaults(handler=_review)


def _serve(args: argparse.Namespace, config: Config) -> int:
    from daemon.web.security import TokenRequiredError
    from daemon.web.server import exec_server, url_of

    host = args.host or config.web.host
    port = config.web.port if args.port is None else args.port
    try:
        print(f"review page at {url_of(host, port)}", flush=True)
        exec_server(config, host=host, port=port)  # returns only by raising
    except TokenRequiredError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _reviewer(args: argparse.Namespace) -> str:
    if args.by:
        return args.by
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or "cli"


def _review(args: argparse.Namespace, config: Config) -> int:
    from daemon.actions import review
    from daemon.store import StoreError

    store, _queue = open_state(config)
    with contextlib.closing(store):
        image = _published(store, config, args.path)
        if image is None:
            print(f"error: {args.path}: no published image recorded there", file=sys.stderr)
            return EXIT_FAILED
        decision = "approved" if args.approve else "rejected"
        try:
            done = review(
                store, image.output_id, decision, reviewer=_reviewer(args), note=args.note
            )
        except (ValueError, StoreError) as exc:
            print(f"error: {args.path}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if args.json:
        print(json.dumps(done.as_json()))
    else:
        print(f"{done.output_path}: {done.decision} by {done.reviewer}")
    return EXIT_OK


def _published(store, config: Config, path: Path):  # -> PublishedImage | None
    """An output image (under the output folder) or a source (its newest image)."""
    output_root = Path(config.watch.output).expanduser().resolve()
    absolute = Path(os.path.abspath(path))
    with contextlib.suppress(ValueError):
        return store.published_image_at(absolute.relative_to(output_root).as_posix())
    found = store.published_image_at(path.as_posix())
    if found is not None:
        return found
    return store.latest_image_of(relative_to_watched(config, path))
