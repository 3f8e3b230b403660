"""`scanrestore process`: restore images once, publish them versioned, and exit."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from daemon.cli.base import EXIT_FAILED, EXIT_OK, chain_path, log
from daemon.config import Config, model_store
from daemon.processing import OutputSettings, Stamp, failure_of, process_image
from daemon.publish import publish_files
from pipeline.chain import Chain, ChainConfigError, build_chain
from pipeline.models import TrustedModels
from pipeline.stage import StageContext

__all__ = ["register"]


def register(commands: argparse._SubParsersAction) -> None:
    process = commands.add_parser("process", help="restore images once and exit")
    process.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    process.add_argument("--out", type=Path, required=True, help="output folder")
    process.add_argument("--scale", type=float, help="upscale factor (up to 8)")
    process.add_argument("--model", help="upscale model id or weights file")
    process.add_argument("--tile", type=int, help="tile size in pixels (0 = whole image)")
    process.add_argument(
        "--chain",
        help="stage kinds in order, e.g. denoise,upscale (options from the config's stage of "
        "that kind, else defaults)",
    )
    process.add_argument(
        "--preset",
        help="a named chain from the config's [presets] or the built-in archival, family, "
        "crisp, creative (instead of pipeline.stages)",
    )
    process.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    process.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"])
    process.add_argument(
        "--format",
        choices=["same", "jpeg", "png", "tiff", "webp"],
        help="output format (default: config, else the input's)",
    )
    process.add_argument("--json", action="store_true", help="one JSON object per input")
    process.set_defaults(handler=_process)


@dataclass(frozen=True)
class _Batch:
    """What every input of one `scanrestore process` shares."""

    chain: Chain
    ctx: StageContext
    out: Path
    output: OutputSettings
    software: str
    recipe_sha256: str


def _process(args: argparse.Namespace, config: Config) -> int:
    from daemon.processing import code_version, recipe_of
    from daemon.store import recipe_sha256

    chain = build_chain(_stage_specs(config, args), path=chain_path(config, args))
    output = OutputSettings.from_config(config, output_format=args.format)  # checks a C2PA key
    store = model_store(config)
    chain.check_models(store, path=chain_path(config, args))
    device = args.device or config.processing.device
    precision = args.precision or config.processing.precision
    models = TrustedModels(store)  # each model hashed once for the batch, not per image
    chain.check_licences(models, config.models.allowed_licences, path=chain_path(config, args))
    recipe = recipe_of(
        config,
        chain,
        args.preset,
        {ref: models.resolve(ref).sha256 for _, ref in chain.models()},
        output_format=args.format,
        precision=args.precision,
    )
    if config.processing.threads:
        import torch

        torch.set_num_threads(config.processing.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    show_bar = not args.json and sys.stderr.isatty()
    bar = _Progress(len(args.inputs)) if show_bar else None
    batch = _Batch(
        chain=chain,
        ctx=StageContext(
            models=models,
            device=device,
            precision=precision,
            engine=config.processing.engine,
            seed=config.processing.seed,
            progress=bar.tiles if bar else None,
            scratch_dir=args.out,
        ),
        out=args.out,
        output=output,
        software=f"scanrestore {code_version()}",
        recipe_sha256=recipe_sha256(recipe),
    )
    failures = 0
    for path in args.inputs:
        record = _process_one(path, batch)
        failures += record["status"] != "ok"
        if bar:
            bar.file_done(record)
        _report(record, as_json=args.json, stream=sys.stdout)
    if bar:
        bar.close()
    return EXIT_OK if failures == 0 else EXIT_FAILED


def _stage_specs(config: Config, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The configured chain with the command-line overrides applied to the upscale stage."""
    overrides = {
        key: value
        for key, value in (("scale", args.scale), ("model", args.model), ("tile", args.tile))
        if value is not None
    }
    specs = config.stages(args.preset)
    if args.chain is not None:
        specs = _chain_from_kinds(args.chain, specs)
    upscales = [spec for spec in specs if spec.get("kind") == "upscale"]
    if overrides and not upscales:
        raise ChainConfigError([f"--{key}: the chain has no upscale stage" for key in overrides])
    for spec in upscales:
        spec.update(overrides)
        if args.precision:  # the command line beats a precision pinned in the config
            spec["precision"] = args.precision
    return specs


def _chain_from_kinds(text: str, configured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`--chain denoise,upscale`: those kinds in that order, each with the options of the
    config's first stage of that kind (so the config still tunes them), else the defaults."""
    by_kind: dict[str, dict[str, Any]] = {}
    for spec in configured:
        by_kind.setdefault(spec.get("kind"), spec)
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    if not kinds:
        raise ChainConfigError(["--chain: name at least one stage kind"])
    return [dict(by_kind.get(kind, {"kind": kind})) for kind in kinds]


def _process_one(path: Path, batch: _Batch) -> dict[str, Any]:
    """Process one input the way the daemon's workers do (daemon.processing), then publish its
    files together at the next free version in the output folder."""
    started = time.perf_counter()
    record: dict[str, Any] = {
        "input": str(path),
        "output": None,
        "status": "ok",
        "error": None,
        "seconds": None,
        "stages": [],
    }
    stamp = Stamp(batch.software, secrets.token_hex(8), batch.recipe_sha256)
    try:
        made = process_image(
            path,
            batch.out,
            path.stem,
            chain=batch.chain,
            ctx=batch.ctx,
            output=batch.output,
            stamp=stamp,
        )
        published = publish_files(batch.out, path.stem, made.files)
        record |= {
            "output": str(published[0].final),
            "version": published[0].version,
            "format": made.format,
            "stages": made.stages,
            "credentials": made.credentials,
        }
    except Exception as exc:  # one image's failure must not stop the batch: report it whole
        failure = failure_of(path, exc)
        if failure.internal:
            log.error("internal error on %s\n%s", path, traceback.format_exc())
        record |= {"status": "error", "error": failure.message, "error_type": failure.error_type}
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def _report(record: dict[str, Any], *, as_json: bool, stream: TextIO) -> None:
    if as_json:
        stream.write(json.dumps(record) + "\n")
    elif record["status"] == "ok":
        stream.write(
            f"ok     {record['input']} -> {record['output']} ({record['seconds']:.1f} s)\n"
        )
    else:
        stream.write(f"FAILED {record['error']}\n")
    stream.flush()


class _Progress:
    """Two tqdm bars on stderr: files done, and tiles of the current file."""

    def __init__(self, files: int) -> None:
        from tqdm import tqdm

        self._files = tqdm(total=files, unit="file", position=0, file=sys.stderr)
        self._tiles = tqdm(total=0, unit="tile", position=1, leave=False, file=sys.stderr)

    def tiles(self, done: int, total: int) -> None:
        if self._tiles.total != total or done < self._tiles.n:
            self._tiles.reset(total=total)
        self._tiles.update(done - self._tiles.n)

    def file_done(self, record: dict[str, Any]) -> None:
        self._files.update(1)

    def close(self) -> None:
        self._tiles.close()
        self._files.close()
