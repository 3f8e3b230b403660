"""GPU benchmark and end-to-end check of the CUDA path, as one short script for a lent GPU.

    python bench/gpu.py [--dry-run] [--out bench/results/gpu.json]

Checks, then measures (each printed and written as JSON):
1. `precision = "auto"` on CUDA picks fp16 where the architecture supports it.
2. fp16 agrees with fp32 (PSNR after 8-bit rounding, tiled, on a real photo); tiles the engine
   ran again in fp32 after a NaN or black fp16 output are counted, and a final output with NaN
   or black (which that fallback should make impossible) fails the run.
3. A real CUDA out-of-memory (a whole-image call far beyond the card) halves the tile and
   completes.
4. s/MP for x4plus and general-x4v3 at several tiles and the whole image, fp16 and fp32,
   batch 1 and 4, and torch.compile.

`--dry-run` runs every step on the CPU with small random models of the same architectures and
small inputs (fp32 only; the out-of-memory step is simulated once), so CI proves the script
works before device time is spent on it. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO)]

from pipeline import tiling  # noqa: E402
from pipeline.image import decode  # noqa: E402
from pipeline.models import ModelStore  # noqa: E402
from pipeline.tiling import Engine, TileSettings, auto_overlap, resolve_precision  # noqa: E402

SHARED = REPO.parent / "shared"
PHOTO = SHARED / "corpus/old_photos/historic/bop_old_b.png"
MODELS = {
    "x4plus": SHARED / "weights/RealESRGAN_x4plus.from-ncnn.pth",
    "general-x4v3": SHARED / "weights/realesr-general-x4v3.from-ncnn.pth",
}
TILES = (0, 256, 512, 1024)  # the whole image first: the fp32 one is the reference
DEFAULT_OUT = REPO / "bench/results/gpu.json"


def psnr8(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB after rounding both to 8 bits; None where identical."""
    mse = float(np.mean((np.rint(a * 255) - np.rint(b * 255)) ** 2))
    return None if mse == 0 else 10 * math.log10(255**2 / mse)


def broken(pixels: np.ndarray) -> str | None:
    """Why an output is unusable (upstream users see black fp16 outputs), or None."""
    if not np.isfinite(pixels).all():
        return "NaN or inf"
    if float(pixels.max()) <= 1 / 255:
        return "black"
    return None


def tiny_models(folder: Path) -> dict[str, Path]:
    """Random RRDBNet and SRVGGNetCompact weights (the dry run's stand-ins for the real ones)."""
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    made = {
        "x4plus": ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=2, scale=4),
        "general-x4v3": Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=4, upscale=4),
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, model in made.items():
        paths[name] = folder / f"{name}.pth"
        torch.save({"params": model.state_dict()}, paths[name])
    return paths


def run_timed(engine: Engine, pixels: np.ndarray, settings: TileSettings) -> dict[str, Any]:
    """One warm-up on a small crop, then one timed pass; s/MP and the tile really used."""
    tiling.run_tiled(engine, pixels[:32, :32], settings)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    result = tiling.run_tiled(engine, pixels, settings)
    sync()
    seconds = time.perf_counter() - started
    megapixels = pixels.shape[0] * pixels.shape[1] / 1e6
    return {"s_per_mp": seconds / megapixels, "tile_used": result.tile, "output": result.pixels}


def check_model(
    name: str, weights: Path, pixels: np.ndarray, device: str, dry: bool, store: ModelStore
) -> dict[str, Any]:
    fp32 = store.load(str(weights), device=device, dtype=torch.float32).descriptor
    report: dict[str, Any] = {"auto_precision": resolve_precision("auto", device, fp32)}
    if device == "cuda":
        assert report["auto_precision"] == ("fp16" if fp32.supports_half else "fp32"), report
    engines = {"fp32": Engine(fp32, device=device, precision="fp32")}
    if device == "cuda" and fp32.supports_half:
        half = store.load(str(weights), device=device, dtype=torch.float16).descriptor
        engines["fp16"] = Engine(half, device=device, precision="fp16", fp32_descriptor=fp32)
    reference = None
    rows = []
    for precision, engine in engines.items():
        for tile in (0, 32) if dry else TILES:
            for batch in (1, 4) if tile else (1,):
                overlap = auto_overlap(fp32, precision) if tile else 0
                settings = TileSettings(tile=tile, overlap=overlap, batch=batch)
                fallbacks = engine.fp32_fallbacks
                row = run_timed(engine, pixels, settings)
                # Tiles the engine ran again in fp32 after a NaN/black fp16 output.
                row["fp32_fallback_tiles"] = engine.fp32_fallbacks - fallbacks
                output = row.pop("output")
                if reference is None and precision == "fp32" and tile == 0:
                    reference = output
                row |= {"precision": precision, "tile": tile, "batch": batch}
                row["broken"] = broken(output)
                row["psnr_vs_fp32_whole"] = None if reference is None else psnr8(output, reference)
                rows.append(row)
                log(f"{name} {precision} tile {tile or 'whole'} batch {batch}: {row}")
    report["rows"] = rows
    report["compile"] = _compiled(fp32, pixels, device, auto_overlap(fp32), dry)
    return report


def _compiled(descriptor: Any, pixels: np.ndarray, device: str, overlap: int, dry: bool) -> Any:
    if dry:
        return "skipped in the dry run (a first compile takes minutes on a loaded CPU)"
    try:
        engine = Engine(descriptor, device=device, precision="fp32", compile=True)
        row = run_timed(engine, pixels, TileSettings(tile=256, overlap=overlap))
        row.pop("output")
        return row
    except Exception as exc:  # a missing compiler toolchain is a finding, not a crash
        return f"failed: {exc!r}"


def check_oom(weights: Path, pixels: np.ndarray, device: str, store: ModelStore) -> dict[str, Any]:
    """A whole-image call on a huge input must run out of memory, halve the tile, and finish."""
    descriptor = store.load(str(weights), device=device).descriptor
    engine = Engine(descriptor, device=device, precision="fp32")
    if device == "cuda":
        big = np.tile(pixels, (8, 8, 1))[:4096, :4096]  # x4plus at 16 MP in one call: far over
        result = tiling.run_tiled(engine, big, TileSettings(tile=4096, overlap=32))
        return {"asked_tile": 4096, "tile_used": result.tile, "input": list(big.shape)}
    real, calls = engine.infer, []

    def failing_once(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[-1])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated in the dry run")
        return real(batch)

    engine.infer = failing_once  # type: ignore[method-assign]
    result = tiling.run_tiled(engine, pixels, TileSettings(tile=64, overlap=8))
    assert result.tile == 32, result.tile
    return {"asked_tile": 64, "tile_used": result.tile, "simulated": True}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, small random models")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; use --dry-run to check the script", file=sys.stderr)
        return 2
    if not PHOTO.exists():
        print(f"error: {PHOTO} (real photos) is not present", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    side = 64 if args.dry_run else 1024
    full = decode(PHOTO).pixels
    top, left = (full.shape[0] - side) // 2, (full.shape[1] - side) // 2
    pixels = np.ascontiguousarray(full[top : top + side, left : left + side, :3])
    with tempfile.TemporaryDirectory(prefix="scanrestore-gpu-") as work:
        report = measure(pixels, device, args.dry_run, Path(work))
    _print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0 if not report["broken_outputs"] else 1


def measure(pixels: np.ndarray, device: str, dry: bool, work: Path) -> dict[str, Any]:
    side = pixels.shape[0]
    store = ModelStore(work / "models")
    weights = tiny_models(work / "tiny") if dry else MODELS
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run on the CPU)"
    report: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "input": [side, side]}
    report["models"] = {
        name: check_model(name, path, pixels, device, dry, store) for name, path in weights.items()
    }
    report["oom"] = check_oom(weights["general-x4v3"], pixels, device, store)
    broken_rows = [r for m in report["models"].values() for r in m["rows"] if r["broken"]]
    report["broken_outputs"] = len(broken_rows)
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"GPU: {report['gpu']}, torch {report['torch']}, input {report['input']}")
    print(f"{'model':<14}{'prec':<6}{'tile':>6}{'batch':>6}{'s/MP':>9}{'PSNR dB':>9}  broken")
    for name, model in report["models"].items():
        for r in model["rows"]:
            db = r["psnr_vs_fp32_whole"]
            text = "-" if db is None else f"{db:.1f}"
            print(
                f"{name:<14}{r['precision']:<6}{r['tile'] or 'whole':>6}{r['batch']:>6}"
                f"{r['s_per_mp']:>9.3f}{text:>9}  {r['broken'] or ''}"
            )
        print(f"{name:<14}auto precision: {model['auto_precision']}; compile: {model['compile']}")
    print(f"out of memory: {report['oom']}")


if __name__ == "__main__":
    sys.exit(main())
