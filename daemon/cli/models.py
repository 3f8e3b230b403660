"""`scanrestore models`: list, fetch, import and verify model weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from daemon.cli.base import EXIT_FAILED, EXIT_OK
from daemon.config import Config, model_store

__all__ = ["register"]


def register(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="list, fetch, import and verify model weights")
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="registry and cache status")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_models_list)
    fetch = actions.add_parser("fetch", help="download official weights, hash-verified")
    fetch.add_argument("ids", nargs="+", metavar="ID")
    fetch.set_defaults(handler=_models_fetch)
    importing = actions.add_parser("import", help="add a local weights file to the cache")
    importing.add_argument("path", type=Path)
    importing.add_argument("--id", dest="model_id", help="id for a custom (non-registry) model")
    importing.add_argument(
        "--licence", help="the weights' licence as an SPDX id (checked against allowed_licences)"
    )
    importing.set_defaults(handler=_models_import)
    verify = actions.add_parser("verify", help="re-hash every cached model")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=_models_verify)


def _models_list(args: argparse.Namespace, config: Config) -> int:
    rows = [
        {
            "id": spec.id,
            "purpose": spec.purpose,
            "architecture": spec.architecture,
            "scale": spec.scale,
            "licence": spec.licence,
            "status": status,
            "sha256": spec.sha256,
            "url": spec.url,
        }
        for spec, status in model_store(config).list()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        print(
            f"{row['id']:<28} {row['purpose']:<8} {row['architecture']:<16} "
            f"x{row['scale']:<2} {row['status']:<8} {row['licence']}"
        )
    return EXIT_OK


def _models_fetch(args: argparse.Namespace, config: Config) -> int:
    store = model_store(config)
    for model_id in args.ids:
        path = store.fetch(model_id)
        print(f"ok     {model_id} -> {path}")
    return EXIT_OK


def _models_import(args: argparse.Namespace, config: Config) -> int:
    spec = model_store(config).import_file(args.path, model_id=args.model_id, licence=args.licence)
    print(f"ok     {args.path} -> {spec.id} (sha256 {spec.sha256})")
    return EXIT_OK


def _models_verify(args: argparse.Namespace, config: Config) -> int:
    results = model_store(config).verify()
    bad = [r for r in results if r.status in ("mismatch", "missing")]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": r.spec.id,
                        "status": r.status,
                        "path": str(r.path),
                        "expected_sha256": r.expected_sha256,
                        "actual_sha256": r.actual_sha256,
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    else:
        for r in results:
            detail = (
                f" (expected {r.expected_sha256}, got {r.actual_sha256})"
                if r.status == "mismatch"
                else ""
            )
            print(f"{r.status:<8} {r.spec.id} {r.path}{detail}")
    return EXIT_OK if not bad else EXIT_FAILED
