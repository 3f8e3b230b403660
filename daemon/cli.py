"""The `scanrestore` command line: one-shot processing and model management."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from daemon.config import Config, ConfigError, load_config, model_store
from daemon.logs import log_to_stderr
from daemon.processing import OutputSettings, Stamp, failure_of, process_image
from daemon.publish import publish_files
from pipeline.chain import Chain, ChainConfigError, build_chain
from pipeline.errors import ModelError
from pipeline.models import TrustedModels
from pipeline.stage import StageContext

__all__ = ["main"]

log = logging.getLogger("scanrestore")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


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

    watch = commands.add_parser("watch", help="run the daemon on the configured folders")
    watch.add_argument("--once", action="store_true", help="process what is there, then exit")
    watch.add_argument("--preset", help="a named chain instead of pipeline.stages")
    watch.set_defaults(handler=_watch)

    status = commands.add_parser("status", help="queue counts, current job, recent failures")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)
    history = commands.add_parser("history", help="every version made of a source")
    history.add_argument("path", type=Path, metavar="PATH")
    history.add_argument("--json", action="store_true")
    history.set_defaults(handler=_history)
    retry = commands.add_parser("retry", help="queue failed or quarantined files again")
    retry.add_argument("path", type=Path, nargs="?", metavar="PATH")
    retry.add_argument("--all-failed", action="store_true")
    retry.add_argument("--json", action="store_true")
    retry.set_defaults(handler=_retry)
    reprocess = commands.add_parser("reprocess", help="make a new version of a source now")
    reprocess.add_argument("path", type=Path, metavar="PATH")
    reprocess.add_argument("--preset", help="the preset the daemon runs, if not the config's")
    reprocess.add_argument("--json", action="store_true")
    reprocess.set_defaults(handler=_reprocess)
    quarantine = commands.add_parser("quarantine", help="files set aside after repeated failure")
    quarantine_actions = quarantine.add_subparsers(dest="action", required=True)
    quarantine_list = quarantine_actions.add_parser("list")
    quarantine_list.add_argument("--json", action="store_true")
    quarantine_list.set_defaults(handler=_quarantine_list)

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
    importing.set_defaults(handler=_models_import)
    verify = actions.add_parser("verify", help="re-hash every cached model")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=_models_verify)
    return parser


# ---------------------------------------------------------------- daemon


def _watch(args: argparse.Namespace, config: Config) -> int:
    from daemon import systemd
    from daemon.service import Daemon, DaemonError

    # A config or chain problem must not be restarted in a loop by systemd.
    try:
        chain = config.chain(args.preset)
        chain.check_models(model_store(config), path=_chain_path(config, args))
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
    finally:
        if watchdog is not None:
            watchdog.stop()
    return code if not args.once or daemon.failures == 0 else EXIT_FAILED


def _open_state(config: Config):  # -> tuple[Store, JobQueue]
    from daemon.queue import JobQueue
    from daemon.service import state_dir
    from daemon.store import open_database

    store = open_database(state_dir(config) / "scanrestore.db")
    return store, JobQueue(store, lease_seconds=config.daemon.lease_seconds)


_NOTABLE_EVENTS = ("refused", "unreadable", "waiting")


def _relative(config: Config, path: Path) -> str:
    """A source path as the daemon records it: relative to the watched folder."""
    root = Path(config.watch.input).expanduser().resolve()
    candidate = path if path.is_absolute() else Path.cwd() / path
    if not path.is_absolute() and not candidate.exists() and not str(path).startswith(".."):
        return path.as_posix()  # already relative to the watched folder
    try:
        return Path(os.path.abspath(candidate)).relative_to(root).as_posix()
    except ValueError:
        raise ChainConfigError([f"{path}: not inside the watched folder {root}"]) from None


def _status(args: argparse.Namespace, config: Config) -> int:
    from daemon.schedule import ActiveHours

    store, queue = _open_state(config)
    with contextlib.closing(store):
        hours = ActiveHours.parse(config.schedule.active_hours)
        fixity = store.fixity_status()
        report = {
            "counts": queue.counts(),
            "current": [
                {"path": job.path, "job": job.id, "since": str(job.heartbeat_at)}
                for job in queue.current()
            ],
            "recent_failures": [
                {
                    "path": job.path,
                    "state": job.state,
                    "error": job.last_error,
                    "attempts": job.attempts,
                }
                for job in queue.recent_failures(10)
            ],
            "recent_events": [
                {"at": e.occurred_at.isoformat(), "kind": e.kind, "path": e.path, **e.detail}
                for e in store.events(kinds=_NOTABLE_EVENTS, limit=20)
            ],
            "next_window": None if hours.always else hours.next_open().isoformat(),
            "window_open": hours.is_open(),
            "fixity": None
            if fixity is None
            else {
                "finished_at": fixity.finished_at.isoformat(),
                "checked": fixity.checked,
                "problems": [{"kind": e.kind, "path": e.path} for e in fixity.problems],
            },
        }
    if args.json:
        print(json.dumps(report, default=str))
        return EXIT_OK
    counts = ", ".join(f"{state} {count}" for state, count in report["counts"].items())
    print(f"queue: {counts}")
    for job in report["current"]:
        print(f"processing: {job['path']}")
    print(
        "window: always open"
        if report["next_window"] is None
        else f"window: {'open' if report['window_open'] else 'closed'}, "
        f"next opens {report['next_window']}"
    )
    for job in report["recent_failures"]:
        print(f"{job['state']}: {job['path']}: {job['error']}")
    for event in report["recent_events"]:
        print(f"{event['kind']}: {event['path']}: {event.get('reason') or event.get('error', '')}")
    if report["fixity"]:
        fix = report["fixity"]
        print(
            f"fixity: {fix['checked']} files checked at {fix['finished_at']}, "
            f"{len(fix['problems'])} problems"
        )
        for problem in fix["problems"]:
            print(f"  {problem['kind']}: {problem['path']}")
    return EXIT_OK


def _history(args: argparse.Namespace, config: Config) -> int:
    store, _queue = _open_state(config)
    relative = _relative(config, args.path)
    with contextlib.closing(store):
        runs = store.history(relative)
    records = [
        {
            "run": run.id,
            "run_token": run.run_token,
            "path": run.path,
            "status": run.status,
            "source_sha256": run.source_sha256,
            "recipe_sha256": run.recipe_sha256,
            "recipe": run.recipe,
            "finished_at": run.finished_at.isoformat(),
            "error": run.error,
            "stages": [
                {
                    "stage": s.stage,
                    "version": s.version,
                    "model": s.model_id,
                    "model_sha256": s.model_sha256,
                    "params": s.params,
                    "seconds": s.seconds,
                }
                for s in run.stages
            ],
            "outputs": [
                {"path": o.path, "version": o.version, "sha256": o.output_sha256, "kind": o.kind}
                for o in run.outputs
            ],
        }
        for run in runs
    ]
    if args.json:
        print(json.dumps(records))
    else:
        if not records:
            print(f"{relative}: no runs recorded")
        for record in records:
            outputs = ", ".join(o["path"] for o in record["outputs"]) or "-"
            stages = " -> ".join(
                s["stage"] + (f" ({s['model']})" if s["model"] else "") for s in record["stages"]
            )
            recipe = record["recipe_sha256"][:12]
            print(
                f"{record['finished_at']} {record['status']} {record['path']} recipe {recipe}: "
                f"{stages or '-'}: {outputs}"
            )
    return EXIT_OK if records else EXIT_FAILED


def _retry(args: argparse.Namespace, config: Config) -> int:
    if (args.path is None) == (not args.all_failed):
        raise ChainConfigError(["retry: give a PATH or --all-failed"])
    store, queue = _open_state(config)
    with contextlib.closing(store):
        path = None if args.path is None else _relative(config, args.path)
        jobs = queue.retry(path, all_failed=args.all_failed)
    if args.json:
        print(json.dumps([{"path": job.path, "job": job.id} for job in jobs]))
    else:
        print(f"{len(jobs)} queued again" + "".join(f"\n  {job.path}" for job in jobs))
    return EXIT_OK if jobs else EXIT_FAILED


def _reprocess(args: argparse.Namespace, config: Config) -> int:
    from daemon.processing import recipe_of
    from pipeline.files import sha256_file

    relative = _relative(config, args.path)
    source = Path(config.watch.input).expanduser().resolve() / relative
    sha = sha256_file(source)
    store, queue = _open_state(config)
    with contextlib.closing(store):
        chain = config.chain(args.preset)
        recipe = store.record_recipe(recipe_of(config, chain, args.preset))
        store.record_observation(relative, sha, size=source.stat().st_size)
        queued = queue.enqueue(relative, sha, recipe, force=True)
    result = {"path": relative, "job": queued.job.id, "created": queued.created}
    print(json.dumps(result) if args.json else f"{relative}: queued as job {queued.job.id}")
    return EXIT_OK


def _quarantine_list(args: argparse.Namespace, config: Config) -> int:
    store, queue = _open_state(config)
    with contextlib.closing(store):
        jobs = queue.quarantined()
    records = [
        {
            "path": j.path,
            "reason": j.quarantine_reason,
            "attempts": j.attempts,
            "worker_deaths": j.worker_deaths,
        }
        for j in jobs
    ]
    if args.json:
        print(json.dumps(records))
    else:
        for record in records:
            print(f"{record['path']}: {record['reason']}")
        if not records:
            print("nothing quarantined")
    return EXIT_OK


# ---------------------------------------------------------------- process


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

    chain = build_chain(_stage_specs(config, args), path=_chain_path(config, args))
    store = model_store(config)
    chain.check_models(store, path=_chain_path(config, args))
    device = args.device or config.processing.device
    precision = args.precision or config.processing.precision
    models = TrustedModels(store)  # each model hashed once for the batch, not per image
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
            seed=config.processing.seed,
            progress=bar.tiles if bar else None,
            scratch_dir=args.out,
        ),
        out=args.out,
        output=OutputSettings.from_config(config, output_format=args.format),
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


def _chain_path(config: Config, args: argparse.Namespace) -> str:
    if getattr(args, "chain", None) is not None:
        return "--chain"
    preset = args.preset or config.pipeline.preset
    return f"presets.{preset}" if preset else "pipeline.stages"


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


# ---------------------------------------------------------------- models


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
    spec = model_store(config).import_file(args.path, model_id=args.model_id)
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


if __name__ == "__main__":
    sys.exit(main())
