"""CPU upscale benchmark: our tiled engine beside upstream Real-ESRGAN, measured in one run.

    python bench/upscale.py [--quick] [--bf16] [--compile] [--engines torch,ncnn,openvino,auto]
        [--threads 2]
        [--reps 1] [--models x4plus,general-x4v3] [--rss-sizes 1,4,16]
        [--out bench/results/upscale.json]

1. Throughput (s and MP/s per input megapixel) per model, tile size, engine and precision, for
   pipeline.tiling (torch; ncnn and OpenVINO with their conversion times; `auto`: what the
   upscale stage picks here, its cold-cache first use timed) and for upstream's RealESRGANer
   (_reference.py), on the same real photos.
2. Agreement: PSNR after 8-bit rounding of every tiled output against our fp32 whole-image one.
3. Peak RSS and seconds of decode -> upscale x4 -> 16-bit TIFF, one fresh process per size.

Prints tables and writes JSON. The machine may be shared: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # runnable as a script from a plain checkout

import _reference  # noqa: E402

from pipeline.errors import StageError  # noqa: E402
from pipeline.image import decode, encode  # noqa: E402
from pipeline.models import ModelStore  # noqa: E402
from pipeline.tiling import (  # noqa: E402
    Engine,
    TileSettings,
    auto_overlap,
    cpu_has_fast_bf16,
    resolve_precision,
    run_tiled,
)

SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights"
PHOTOS = ("corpus/sr_benchmark/Set14/HR/barbara.png", "corpus/old_photos/historic/bop_old_b.png")
RSS_PHOTO = "corpus/old_photos/historic/bop_old_d.png"
RSS_MODEL = "general-x4v3"  # x4plus at 16 MP would take hours on a CPU
RSS_TILE = 256
WARM_SIZE = 64  # warm-up input: thread pool, allocator and oneDNN set-up, not the whole pass
DEFAULT_OUT = REPO / "bench/results/upscale.json"


@dataclass(frozen=True)
class Case:
    """One model and its workload: a square centre crop of the first `photos` of PHOTOS."""

    name: str
    weights: Path
    crop: int
    photos: int
    tiles: tuple[int, ...]


# x4plus is ~15x slower than the compact model on a CPU, so it gets one smaller crop and two
# tile sizes to keep a full run near half an hour. Crops are larger than tile + overlap, so
# every tiled row really has seams (a tile reads `tile + overlap` pixels a side, as upstream
# reads tile + 2 * tile_pad).
CASES = (
    Case("x4plus", WEIGHTS / "RealESRGAN_x4plus.from-ncnn.pth", 448, 1, (128, 192)),
    Case("general-x4v3", WEIGHTS / "realesr-general-x4v3.from-ncnn.pth", 768, 2, (128, 256, 384)),
)
QUICK = {
    "x4plus": {"crop": 224, "tiles": (96,)},
    "general-x4v3": {"crop": 256, "photos": 1, "tiles": (96, 128)},
}


@dataclass
class Row:
    """One throughput measurement: every photo of the case, once per repetition."""

    model: str
    method: str  # "ours" or "upstream"
    precision: str
    tile: int  # 0: the whole image in one call
    context: str  # our feathered overlap, or upstream's tile_pad
    tiles: int  # model calls per pass
    megapixels: float  # input megapixels per pass
    seconds: list[float]  # per pass, warm-up excluded
    warmup_s: float
    # Per photo, vs our fp32 whole-image output (None: identical; empty: this is that output).
    psnr_db: dict[str, float | None]
    compiled: bool = False
    engine: str = "torch"  # pipeline.runtimes: torch, ncnn, openvino, or auto:<its choice>
    s_per_mp: float = field(init=False)
    mp_per_s: float = field(init=False)
    speedup_vs_upstream: float | None = None

    def __post_init__(self) -> None:
        self.s_per_mp = min(self.seconds) / self.megapixels
        self.mp_per_s = 1 / self.s_per_mp


@dataclass
class Bench:
    """What every measurement shares."""

    store: ModelStore
    workdir: Path
    reps: int
    bf16: bool
    compile: bool
    upstream: _reference.Upstream | None
    engines: tuple[str, ...] = ("torch",)
    skipped: list[dict[str, str]] = field(default_factory=list)


def log(message: str) -> None:
    """Progress for long runs, on stderr so stdout holds only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def psnr8(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB after rounding both to 8 bits; None where they are identical."""
    a8, b8 = np.rint(a * 255), np.rint(b * 255)
    mse = float(np.mean((a8 - b8) ** 2))
    return None if mse == 0 else 10 * math.log10(255**2 / mse)


def load_crop(relative: str, size: int) -> np.ndarray:
    """A square centre crop of a corpus photo as float32 RGB (H, W, 3)."""
    pixels = decode(SHARED / relative).pixels
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    height, width = pixels.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


def timed_passes(
    run: Callable[[Any], Any], inputs: Sequence[Any], warm: Any, reps: int
) -> tuple[float, list[float], list[Any]]:
    """Warm-up seconds, seconds per pass over `inputs`, and the first pass's outputs."""
    started = time.perf_counter()
    run(warm)
    warmup = time.perf_counter() - started
    seconds: list[float] = []
    first: list[Any] = []
    for _ in range(reps):
        started = time.perf_counter()
        outputs = [run(item) for item in inputs]
        seconds.append(time.perf_counter() - started)
        first = first or outputs
    return warmup, seconds, first


def measure_ours(
    engine: Engine,
    images: list[np.ndarray],
    tile: int,
    reps: int,
    references: list[np.ndarray] | None = None,
) -> tuple[Row, list[np.ndarray]]:
    """Time run_tiled at `tile` (0: whole image) with the descriptor's automatic overlap."""
    overlap = auto_overlap(engine.descriptor, engine.precision) if tile else 0
    settings = TileSettings(tile=tile, overlap=overlap)
    # A compiled module specialises on the tile shape, so it warms up on exactly that shape.
    side = tile if engine.compiled and tile else WARM_SIZE
    calls: list[int] = []

    def run(pixels: np.ndarray) -> np.ndarray:
        result = run_tiled(engine, pixels, settings)
        calls.append(result.tiles)
        return result.pixels

    warmup, seconds, outputs = timed_passes(run, images, images[0][:side, :side], reps)
    row = Row(
        model="",
        method="ours",
        precision=engine.precision,
        tile=tile,
        context=f"overlap {overlap}" if tile else "-",
        tiles=sum(calls[1 : 1 + len(images)]),
        megapixels=_megapixels(images),
        seconds=seconds,
        warmup_s=warmup,
        psnr_db=_psnrs(outputs, references) if references else {},
        compiled=engine.compiled,
        engine=getattr(engine, "name", "torch"),
    )
    return row, outputs


def measure_upstream(
    bench: Bench, case: Case, images: list[np.ndarray], tile: int, references: list[np.ndarray]
) -> Row:
    """Time RealESRGANer.enhance on the same pixels, given as upstream takes them (8-bit BGR)."""
    if bench.upstream is None:
        raise ValueError("measure_upstream: the upstream reference is not loaded")
    upsampler = bench.upstream.upsampler(case.weights, tile, bench.workdir)
    bgr = [np.rint(image[..., ::-1] * 255).astype(np.uint8) for image in images]
    warmup, seconds, outputs = timed_passes(
        lambda image: _reference.enhance(upsampler, image), bgr, bgr[0][:WARM_SIZE, :WARM_SIZE],
        bench.reps,
    )  # fmt: skip
    rgb = [output[..., ::-1].astype(np.float32) / 255 for output in outputs]
    # Upstream cuts tiles from the image after its bottom/right reflection pre-pad.
    padded = [(h + _reference.PRE_PAD, w + _reference.PRE_PAD) for h, w, _ in map(np.shape, images)]
    return Row(
        model="",
        method="upstream",
        precision="fp32",
        tile=tile,
        context=f"tile_pad {_reference.TILE_PAD}",
        tiles=sum(math.ceil(h / tile) * math.ceil(w / tile) for h, w in padded),
        megapixels=_megapixels(images),
        seconds=seconds,
        warmup_s=warmup,
        psnr_db=_psnrs(rgb, references),
    )


def _megapixels(images: list[np.ndarray]) -> float:
    return sum(image.shape[0] * image.shape[1] for image in images) / 1e6


def _psnrs(outputs: list[np.ndarray], references: list[np.ndarray]) -> dict[str, float | None]:
    return {
        PHOTOS[i]: psnr8(out, ref)
        for i, (out, ref) in enumerate(zip(outputs, references, strict=True))
    }


_BF16_EMULATED = (
    "cpu_has_fast_bf16() is false (no AVX-512 BF16/AMX): oneDNN emulates bf16, ~10x slower "
    "than fp32; pass --bf16 to measure it anyway"
)


def extra_engines(bench: Bench, case: Case, descriptor: Any) -> list[Engine]:
    """bf16 (where asked for or natively fast) and compiled fp32 engines; skips are recorded."""
    engines = []
    if bench.bf16 or cpu_has_fast_bf16():
        try:
            precision = resolve_precision("bf16", "cpu", descriptor)
            engines.append(Engine(descriptor, device="cpu", precision=precision))
        except StageError as exc:
            bench.skipped.append({"model": case.name, "what": "bf16", "reason": str(exc)})
    else:
        bench.skipped.append({"model": case.name, "what": "bf16", "reason": _BF16_EMULATED})
    if bench.compile:
        engines.append(Engine(descriptor, device="cpu", precision="fp32", compile=True))
    return engines


def ncnn_engine(bench: Bench, case: Case, descriptor: Any, info: dict[str, Any]) -> Any:
    """The ncnn engine for the case, its conversion timed (into a fresh cache: a cold start)."""
    from pipeline.runtimes.ncnn import NcnnEngine, convert_ncnn

    started = time.perf_counter()
    converted = convert_ncnn(descriptor, case.name, bench.workdir / "converted" / case.name)
    info["ncnn_conversion_s"] = round(time.perf_counter() - started, 3)
    info["ncnn_sha256"] = converted.sha256
    return NcnnEngine(descriptor, converted, threads=torch.get_num_threads())


def ncnn_engines(bench: Bench, case: Case, descriptor: Any, info: dict[str, Any]) -> list[Any]:
    """ncnn on the run's threads and, as `auto` also tries, on one ("ncnn@1")."""
    first = ncnn_engine(bench, case, descriptor, info)
    if first.threads == 1:
        return [first]
    single = type(first)(descriptor, first.converted, threads=1)
    single.name = "ncnn@1"
    return [first, single]


def openvino_engines(bench: Bench, case: Case, descriptor: Any, info: dict[str, Any]) -> list[Any]:
    """OpenVINO at f32 inference precision and, where bf16 is native (or --bf16), at bf16; the
    conversion timed into a fresh cache (a cold start)."""
    from pipeline.runtimes.openvino import OpenVinoEngine, convert_openvino

    started = time.perf_counter()
    converted = convert_openvino(descriptor, case.name, bench.workdir / "converted" / case.name)
    info["openvino_conversion_s"] = round(time.perf_counter() - started, 3)
    info["openvino_sha256"] = converted.sha256
    threads = torch.get_num_threads()
    engines = [OpenVinoEngine(descriptor, converted, threads=threads)]
    if bench.bf16 or cpu_has_fast_bf16():
        engines.append(OpenVinoEngine(descriptor, converted, threads=threads, precision="bf16"))
    return engines


class _Named:
    """An engine under another name in the table (what `auto` chose, labelled as such)."""

    def __init__(self, engine: Any, name: str) -> None:
        self._engine, self.name = engine, name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._engine, attribute)


def auto_engine(case: Case, images: list[np.ndarray], tile: int, workdir: Path) -> tuple[Any, dict]:
    """What the upscale stage's `engine = "auto"` picks on this machine at `tile`, with a cold
    cache: conversions and calibration on the first photo's centre tile, as a first image pays."""
    from pipeline.image import Image, Metadata
    from pipeline.stage import StageContext
    from pipeline.stages.upscale import UpscaleOptions, UpscaleStage

    ctx = StageContext(models=ModelStore(workdir / f"auto-{case.name}-{tile}"), device="cpu")
    stage = UpscaleStage(UpscaleOptions(model=str(case.weights), tile=tile, engine="auto"))
    image = Image(pixels=images[0], alpha=None, bit_depth=8, format="png", metadata=Metadata())
    started = time.perf_counter()
    engine, params = stage.engine_for(image, ctx)
    calibration = params.get("engine_calibration", {})
    info = {
        "tile": tile,
        "engine": params["engine"],
        "precision": params["precision"],
        "choice": calibration.get("choice", params["engine"]),
        "first_use_s": round(time.perf_counter() - started, 2),
        "calibration": calibration,
    }
    log(f"{case.name} auto at tile {tile}: {info['choice']} after {info['first_use_s']} s")
    return _Named(engine, f"auto:{info['choice']}"), info


def bench_model(bench: Bench, case: Case) -> tuple[list[Row], dict[str, Any]]:
    """Every method at every tile size for one model, methods interleaved per tile size so
    that each ratio compares measurements taken moments apart."""
    descriptor = bench.store.load(str(case.weights), device="cpu").descriptor
    images = [load_crop(photo, case.crop) for photo in PHOTOS[: case.photos]]
    fp32 = Engine(descriptor, device="cpu", precision="fp32")
    whole, refs = measure_ours(fp32, images, 0, bench.reps)
    rows = [_logged(case, whole)]
    engines = [fp32, *extra_engines(bench, case, descriptor)] if "torch" in bench.engines else []
    info: dict[str, Any] = {}
    if "ncnn" in bench.engines:
        engines += ncnn_engines(bench, case, descriptor, info)
    if "openvino" in bench.engines:
        engines += openvino_engines(bench, case, descriptor, info)
    for tile in case.tiles:
        measures = [
            lambda e=e, t=tile: measure_ours(e, images, t, bench.reps, refs)[0] for e in engines
        ]
        if "auto" in bench.engines:
            chosen, info[f"auto_tile_{tile}"] = auto_engine(case, images, tile, bench.workdir)
            measures.insert(
                0, lambda e=chosen, t=tile: measure_ours(e, images, t, bench.reps, refs)[0]
            )
        if bench.upstream is not None:
            measures.append(lambda t=tile: measure_upstream(bench, case, images, t, refs))
        rows += [_guarded(bench, case, tile, measure) for measure in measures]
    info |= {
        "architecture": descriptor.architecture.id,
        "weights": str(case.weights),
        "auto_precision_cpu": resolve_precision("auto", "cpu", descriptor),
        "supports_bfloat16": bool(descriptor.supports_bfloat16),
        "auto_overlap": auto_overlap(descriptor),
        "auto_overlap_reduced_precision": auto_overlap(descriptor, "bf16"),
        "crop": case.crop,
        "photos": list(PHOTOS[: case.photos]),
        "tiles": list(case.tiles),
    }
    return _with_speedups([row for row in rows if row is not None]), info


def _guarded(bench: Bench, case: Case, tile: int, measure: Callable[[], Row]) -> Row | None:
    """Run one measurement; a failure (e.g. torch.compile without a compiler) is recorded."""
    try:
        return _logged(case, measure())
    except Exception as exc:  # one broken method must not lose the rest of a long run
        bench.skipped.append({"model": case.name, "what": f"tile {tile}", "reason": repr(exc)})
        log(f"{case.name} tile {tile}: FAILED {exc!r}")
        return None


def _logged(case: Case, row: Row) -> Row:
    row.model = case.name
    log(
        f"{case.name} {row.method} {row.engine} {row.precision}"
        f"{' compiled' if row.compiled else ''} "
        f"tile {row.tile or 'whole'}: {row.s_per_mp:.2f} s/MP"
    )
    return row


def _with_speedups(rows: list[Row]) -> list[Row]:
    upstream = {row.tile: row.s_per_mp for row in rows if row.method == "upstream"}
    for row in rows:
        if row.method == "ours" and row.tile in upstream:
            row.speedup_vs_upstream = upstream[row.tile] / row.s_per_mp
    return rows


# ---------------------------------------------------------------- peak RSS, one process per size


def make_rss_input(source: np.ndarray, megapixels: float, folder: Path) -> Path:
    """A square 16-bit RGB TIFF of `megapixels`, mirror-tiled from a real photo so it keeps
    real detail at every size (an upscaled photo would be unnaturally smooth)."""
    import tifffile

    side = round(math.sqrt(megapixels * 1e6))
    grow = [(0, max(0, side - source.shape[0])), (0, max(0, side - source.shape[1])), (0, 0)]
    pixels = np.pad(source, grow, mode="symmetric")[:side, :side]
    path = folder / f"input-{megapixels:g}mp.tif"
    tifffile.imwrite(path, np.rint(pixels * 65535).astype(np.uint16), photometric="rgb")
    return path


@dataclass(frozen=True)
class RssJob:
    """One image end to end in a fresh process, which writes its measurements to `report`."""

    input: Path
    weights: Path
    route: str  # "cli": scanrestore process; "stage": decode -> UpscaleStage -> encode
    threads: int
    report: Path

    def argv(self) -> list[str]:
        options = {"--rss-child": self.input, "--rss-weights": self.weights,
                   "--rss-route": self.route, "--rss-report": self.report,
                   "--threads": self.threads}  # fmt: skip
        return [sys.executable, str(Path(__file__).resolve())] + [
            str(part) for option in options.items() for part in option
        ]


def bench_rss(sizes: Sequence[float], weights: Path, threads: int, workdir: Path) -> list[dict]:
    """Peak RSS per input size, each in a fresh process: through `scanrestore process` while
    that works, else decode -> UpscaleStage -> encode."""
    source = decode(SHARED / RSS_PHOTO).pixels
    route, results = "cli", []
    for megapixels in sizes:
        folder = workdir / f"rss-{megapixels:g}"
        folder.mkdir()
        path = make_rss_input(source, megapixels, folder)
        result = _rss_process(RssJob(path, weights, route, threads, folder / "report-cli.json"))
        if result.get("error") and route == "cli":
            log(f"rss {megapixels:g} MP: the CLI failed ({result['error']}); using the stage")
            route = "stage"
            job = RssJob(path, weights, route, threads, folder / "report-stage.json")
            result = _rss_process(job) | {"cli_error": result["error"]}
        results.append({"megapixels": megapixels, **result})
        log(f"rss {megapixels:g} MP: {result.get('peak_rss_mb')} MB, {result.get('seconds')} s")
        shutil.rmtree(folder)  # a 16 MP run leaves gigabytes of output and scratch
    return results


def _rss_process(job: RssJob) -> dict[str, Any]:
    done = subprocess.run(job.argv(), capture_output=True, text=True, check=False)
    if done.returncode != 0 or not job.report.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"route": job.route, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(job.report.read_text())


def _proc_status_mb(key: str) -> float:
    """VmHWM/VmRSS of this process. Not ru_maxrss: subprocess spawns with vfork, and Linux
    folds the parent's peak into the child's ru_maxrss at exec, so it reports the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"/proc/self/status has no {key}")


def rss_child(job: RssJob) -> int:
    """Run one image end to end in this (fresh) process and report its peak RSS (VmHWM, with
    the peak from before any reset an engine calibration made to measure one call)."""
    from pipeline.runtimes.calibration import peak_rss_mb

    out = job.report.parent / f"out-{job.route}"
    out.mkdir()
    baseline = _proc_status_mb("VmRSS")  # interpreter, torch and the pipeline imported
    started = time.perf_counter()
    try:
        detail, error = (_via_cli if job.route == "cli" else _via_stage)(job, out), None
    except Exception as exc:  # reported to the parent, which may fall back to the stage
        detail, error = {}, repr(exc)
    seconds = time.perf_counter() - started
    megapixels = float(np.prod(detail.get("input_size", [0]))) / 1e6
    # The kernel keeps RSS in per-CPU counters that it reads approximately, so the baseline's
    # VmRSS can exceed a later VmHWM by a few pages; the process was resident at the baseline.
    peak = max(peak_rss_mb() or baseline, baseline)
    job.report.write_text(json.dumps({
        "route": job.route, "error": error, "peak_rss_mb": peak,
        "baseline_rss_mb": baseline, "seconds": round(seconds, 2),
        "s_per_mp": round(seconds / megapixels, 2) if megapixels else None, **detail,
    }))  # fmt: skip
    return 0


_CLI_CONFIG = """\
[models]
cache_dir = {cache}
auto_fetch = false
[processing]
device = "cpu"
precision = "fp32"
threads = {threads}
[image]
output_format = "tiff"
[[pipeline.stages]]
kind = "upscale"
model = {weights}
scale = 4.0
tile = {tile}
"""


def _via_cli(job: RssJob, out: Path) -> dict[str, Any]:
    from daemon.cli import main as scanrestore

    config = out.parent / "config.toml"
    config.write_text(_CLI_CONFIG.format(  # JSON strings are valid TOML basic strings
        cache=json.dumps(str(out.parent / "models")), weights=json.dumps(str(job.weights)),
        threads=job.threads, tile=RSS_TILE))  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = scanrestore(["--config", str(config), "process", str(job.input),
                            "--out", str(out), "--json"])  # fmt: skip
    record = json.loads(stdout.getvalue().strip().splitlines()[-1])
    if code != 0:
        raise RuntimeError(f"scanrestore process exited {code}: {record.get('error')}")
    return _output_detail(job.input, Path(record["output"]), "scanrestore process (daemon.cli)")


def _via_stage(job: RssJob, out: Path) -> dict[str, Any]:
    from pipeline.stage import StageContext
    from pipeline.stages.upscale import UpscaleOptions, UpscaleStage

    torch.set_num_threads(job.threads)
    image = decode(job.input)
    stage = UpscaleStage(UpscaleOptions(model=str(job.weights), scale=4, tile=RSS_TILE))
    ctx = StageContext(models=ModelStore(out.parent / "models"), device="cpu",
                       precision="fp32", scratch_dir=out)  # fmt: skip
    result = stage.run(image, ctx)
    encode(result.image, out / "output.tif", format="tiff")
    return _output_detail(job.input, out / "output.tif", "decode -> UpscaleStage -> encode")


def _output_detail(input_path: Path, output: Path, how: str) -> dict[str, Any]:
    import tifffile

    with tifffile.TiffFile(input_path) as source, tifffile.TiffFile(output) as result:
        size_in, size_out = source.pages[0].shape[:2], result.pages[0].shape[:2]
        depth = result.pages[0].bitspersample
    return {
        "how": how,
        "input_size": list(size_in),
        "output_size": list(size_out),
        "output_bits": depth,
        "output_mb": round(output.stat().st_size / 2**20, 1),
    }


# ---------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name", platform.processor()),
        "logical_cpus": os.cpu_count(),
        "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "spandrel": metadata.version("spandrel"),
        "threads": torch.get_num_threads(),
        "cpu_has_fast_bf16": cpu_has_fast_bf16(),
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> list[float]:
    return [round(load, 2) for load in os.getloadavg()]


def throughput_table(rows: list[Row]) -> str:
    head = (
        f"{'model':<13}{'method':<9}{'engine':<20}{'tile':>6}  {'context':<12}{'tiles':>6}"
        f"{'s/MP':>9}{'MP/s':>9}{'vs upstream':>13}{'PSNR dB (min)':>15}{'warm-up s':>11}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        worst = _worst_psnr(row.psnr_db)
        speedup = f"{row.speedup_vs_upstream:.2f}x" if row.speedup_vs_upstream else "-"
        precision = f"{row.engine} {row.precision}" + (" compiled" if row.compiled else "")
        lines.append(
            f"{row.model:<13}{row.method:<9}{precision:<20}{row.tile or 'whole':>6}  "
            f"{row.context:<12}{row.tiles:>6}{row.s_per_mp:>9.2f}{row.mp_per_s:>9.4f}"
            f"{speedup:>13}{worst:>15}{row.warmup_s:>11.2f}"
        )
    return "\n".join(lines)


def _worst_psnr(psnr_db: dict[str, float | None]) -> str:
    if not psnr_db:
        return "reference"
    finite = [value for value in psnr_db.values() if value is not None]
    return f"{min(finite):.2f}" if finite else "identical"


def rss_table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'input MP':>9}  {'input':>11}  {'output':>13}  {'route':<7}{'peak RSS MB':>12}"
        f"{'baseline MB':>12}{'above MB':>10}{'seconds':>9}{'s/MP':>7}  error"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        size_in = "x".join(map(str, r.get("input_size", []))) or "-"
        size_out = "x".join(map(str, r.get("output_size", []))) or "-"
        above = round(r["peak_rss_mb"] - r["baseline_rss_mb"], 1) if "peak_rss_mb" in r else "-"
        lines.append(
            f"{r['megapixels']:>9g}  {size_in:>11}  {size_out:>13}  {r['route']:<7}"
            f"{r.get('peak_rss_mb', '-'):>12}{r.get('baseline_rss_mb', '-'):>12}{above:>10}"
            f"{r.get('seconds', '-'):>9}{r.get('s_per_mp') or '-':>7}  "
            f"{r.get('error') or ''}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small crops, fewer tiles, RSS sizes 0.25,1 (a few minutes)",
    )
    parser.add_argument("--models", default=",".join(case.name for case in CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiles", help="tile sizes for every model, e.g. 128,192,256")
    parser.add_argument("--reps", type=int, default=1, help="timed passes; the fastest counts")
    parser.add_argument("--bf16", action="store_true", help="measure bf16 even where emulated")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument(
        "--engines", default="torch,ncnn,openvino,auto", help="engines beside upstream"
    )
    parser.add_argument("--rss-sizes", help="input megapixels, e.g. 1,4,16 ('' to skip)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    # Internal: the fresh process that bench_rss starts for each size.
    for name in ("--rss-child", "--rss-weights", "--rss-route", "--rss-report"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_sizes is None:
        args.rss_sizes = "0.25,1" if args.quick else "1,4,16"
    return args


def _case(name: str) -> Case:
    return next(case for case in CASES if case.name == name)


def selected_cases(args: argparse.Namespace) -> list[Case]:
    wanted = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = set(wanted) - {case.name for case in CASES}
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(sorted(unknown))}")
    cases = [case for case in CASES if case.name in wanted]
    if args.quick:
        cases = [replace(case, **QUICK[case.name]) for case in cases]
    if args.tiles:
        tiles = tuple(int(tile) for tile in args.tiles.split(","))
        cases = [replace(case, tiles=tiles) for case in cases]
    return cases


def run(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], list[Row]]:
    """Measure everything; the JSON report and the throughput rows for the table."""
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
            if not key.startswith("rss_") or key == "rss_sizes"
        },
    }
    try:
        upstream = _reference.fetch_upstream(workdir)
        report["upstream_route"] = upstream.route
    except _reference.UpstreamUnavailable as exc:
        upstream, report["upstream_route"] = None, f"unavailable: {exc}"
    log(f"upstream: {report['upstream_route']}")
    bench = Bench(
        store=ModelStore(workdir / "models"),
        workdir=workdir,
        reps=args.reps,
        bf16=args.bf16,
        compile=args.compile,
        upstream=upstream,
        engines=tuple(name.strip() for name in args.engines.split(",") if name.strip()),
    )
    rows: list[Row] = []
    report["models"] = {}
    for case in selected_cases(args):
        case_rows, report["models"][case.name] = bench_model(bench, case)
        rows += case_rows
    report["throughput"] = [asdict(row) for row in rows]
    report["skipped"] = bench.skipped
    sizes = [float(size) for size in args.rss_sizes.split(",") if size.strip()]
    report["rss"] = {
        "model": RSS_MODEL,
        "tile": RSS_TILE,
        "output": "16-bit TIFF, x4",
        "targets": "peak RSS flat in the input size; 16 MP x4 completes under 3 GB",
        "results": bench_rss(sizes, _case(RSS_MODEL).weights, args.threads, workdir),
    }
    report["machine"]["loadavg_end"] = _loadavg()
    return report, rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_child:
        paths = (Path(args.rss_child), Path(args.rss_weights), Path(args.rss_report))
        return rss_child(RssJob(paths[0], paths[1], args.rss_route, args.threads, paths[2]))
    if not SHARED.is_dir():
        print(f"error: {SHARED} (real weights and photos) is not present", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="scanrestore-bench-") as tmp:
        report, rows = run(args, Path(tmp))
    machine = report["machine"]
    print(
        f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
        f"fast bf16: {machine['cpu_has_fast_bf16']}, load average {machine['loadavg_start']} "
        f"at start, {machine['loadavg_end']} at end"
    )
    print(f"upstream: {report['upstream_route']}\n")
    print(throughput_table(rows))
    for skip in report["skipped"]:
        print(f"skipped: {skip['model']} {skip['what']}: {skip['reason']}")
    if report["rss"]["results"]:
        print(f"\npeak RSS, {RSS_MODEL}, tile {RSS_TILE}, x4 to 16-bit TIFF, one process per size:")
        print(rss_table(report["rss"]["results"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
