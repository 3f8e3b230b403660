"""`scanrestore models`: list, fetch, import and verify model weights; bench the inference
engines on this machine."""

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
    bench = actions.add_parser(
        "bench", help="time each inference engine on a tile of an image; show what auto picks"
    )
    bench.add_argument("model", metavar="ID", help="an upscale model id or weights path")
    bench.add_argument("--image", type=Path, required=True, help="a real photo to take a tile of")
    bench.add_argument("--tile", type=int, default=256)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(handler=_models_bench)


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


def _models_bench(args: argparse.Namespace, config: Config) -> int:
    """The calibration `engine = "auto"` runs (or ran: decisions are cached per machine)."""
    from pipeline.image import decode
    from pipeline.models import TrustedModels
    from pipeline.stage import StageContext
    from pipeline.stages.upscale import UpscaleOptions, UpscaleStage

    stage = UpscaleStage(UpscaleOptions(model=args.model, tile=args.tile, engine="auto"))
    ctx = StageContext(models=TrustedModels(model_store(config)), device="cpu", precision="fp32")
    _, params = stage.engine_for(decode(args.image), ctx)
    calibration = params["engine_calibration"]
    if args.json:
        print(json.dumps({"model": params["model"], **calibration}, indent=2))
        return EXIT_OK
    rows = calibration["measurements"]
    torch_s = next(m["seconds"] for m in rows if m["engine"] == "torch")
    tile = "x".join(map(str, calibration["tile"]))
    when = "recorded earlier" if calibration["cached"] else "measured now"
    print(f"{params['model']}: tile {tile}, {calibration['threads']} threads ({when})")
    print(f"{'engine':<8}{'s/tile':>9}{'vs torch':>10}{'peak MB':>9}{'agreement':>12}  verdict")
    for m in rows:
        db = "identical" if m["agreement_db"] is None else f"{m['agreement_db']:.1f} dB"
        db = "reference" if m["engine"] == "torch" else db
        peak = "-" if m["peak_mb"] is None else f"{m['peak_mb']:.0f}"
        verdict = "ok" if m["passed"] else m["reason"]
        if m["seconds"] is None:  # foreseen over the memory cap, never run at full size
            timing, db = f"{'-':>9}{'-':>10}", "-"
        else:
            timing = f"{m['seconds']:>9.3f}{torch_s / m['seconds']:>9.2f}x"
        print(f"{m['engine']:<8}{timing}{peak:>9}{db:>12}  {verdict}")
    for name, reason in calibration["unavailable"].items():
        print(f"{name:<8} unavailable: {reason}")
    print(f"auto picks: {calibration['choice']}")
    return EXIT_OK
