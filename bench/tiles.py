"""The default tile, re-measured with the engine `auto` picks: seconds per call at each tile
size, the first call's added memory, and what that makes per input megapixel of a whole scan
once the overlap is paid, beside upstream RealESRGANer's own tiling (fp32 NCHW, tile_pad 10).

    python bench/tiles.py [--models x4plus,general-x4v3] [--tiles 256,384,512]
        [--scan 3000x2000] [--out bench/results/tiles.json]

The engine is what the upscale stage's `auto` picks at tile 256 on a real photo (its
calibration, timed as first use). Each tile size is timed on a crop of that photo as run_tiled
cuts it (tile + overlap a side; upstream: tile + 2 x tile_pad), one warm call after a first
one. Seconds per megapixel of a `--scan` sized image are the per-call time times the tiles
each method cuts it into (upstream's smaller edge tiles counted by their area), so overlap
waste is in the number; compare within one run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # runnable as a script from a plain checkout

SHARED = REPO.parent / "shared"
WEIGHTS = {
    "x4plus": SHARED / "weights/RealESRGAN_x4plus.from-ncnn.pth",
    "general-x4v3": SHARED / "weights/realesr-general-x4v3.from-ncnn.pth",
}
PHOTO = "corpus/old_photos/historic/bop_old_c.png"
TILE_PAD = 10  # upstream's inference script default
DEFAULT_OUT = REPO / "bench/results/tiles.json"


def upstream_tiles(length: int, tile: int) -> list[int]:
    """Input lengths of upstream's tiles along one side: `tile` cells, each read with up to
    TILE_PAD more on each side, clipped at the image's edges."""
    sizes = []
    for start in range(0, length, tile):
        end = min(start + tile, length)
        sizes.append(min(end + TILE_PAD, length) - max(start - TILE_PAD, 0))
    return sizes


def ours_tiles(length: int, tile: int, overlap: int) -> tuple[int, int]:
    """(tiles, input length of each) along one side, as run_tiled cuts it."""
    from pipeline.tiling import tile_span, tile_starts

    size = tile_span(length, tile + overlap, overlap)
    return len(tile_starts(length, size, overlap)), size


def timed(call: Any) -> tuple[float, float | None]:
    """Seconds of a warm call, and the memory the first call added at its peak."""
    from pipeline.runtimes.calibration import _peak_mb

    _, peak = _peak_mb(call)
    start = time.perf_counter()
    call()
    return time.perf_counter() - start, peak


def bench_model(name: str, tiles: list[int], scan: tuple[int, int], workdir: Path) -> dict:
    import torch

    from pipeline.image import decode
    from pipeline.models import ModelStore
    from pipeline.stage import StageContext
    from pipeline.stages.upscale import UpscaleOptions, UpscaleStage
    from pipeline.tiling import auto_overlap

    photo = decode(SHARED / PHOTO)
    ctx = StageContext(models=ModelStore(workdir / name), device="cpu")
    stage = UpscaleStage(UpscaleOptions(model=str(WEIGHTS[name]), tile=256, engine="auto"))
    start = time.perf_counter()
    engine, params = stage.engine_for(photo, ctx)
    first_use = time.perf_counter() - start
    choice = params.get("engine_calibration", {}).get("choice", params["engine"])
    overlap = auto_overlap(engine.descriptor, engine.precision)
    upstream_net = ctx.models.load(str(WEIGHTS[name])).descriptor.model  # fp32, NCHW
    width, height = scan
    rows = []
    for tile in tiles:
        side = tile + overlap
        crop = np.ascontiguousarray(photo.pixels[:side, :side])
        if crop.shape[:2] != (side, side):
            raise SystemExit(f"{PHOTO} is smaller than a {side} px tile")
        batch = torch.from_numpy(crop.transpose(2, 0, 1).copy())[None]
        ours_s, ours_peak = timed(lambda b=batch: engine.infer(b))
        pad = tile + 2 * TILE_PAD
        plain = batch[..., :pad, :pad] if pad <= side else torch.nn.functional.pad(
            batch, (0, pad - side, 0, pad - side), mode="replicate"
        )  # fmt: skip

        x_up = plain.contiguous()

        def upstream_call(x: torch.Tensor = x_up) -> None:
            with torch.inference_mode():
                upstream_net(x)

        up_s, up_peak = timed(upstream_call)
        (rows_n, size_h), (cols_n, size_w) = (
            ours_tiles(height, tile, overlap),
            ours_tiles(width, tile, overlap),
        )
        ours_calls = rows_n * cols_n
        # Upstream's calls cost in proportion to their input area (edge tiles are smaller).
        up_area = sum(upstream_tiles(height, tile)) * sum(upstream_tiles(width, tile))
        mp = width * height / 1e6
        row = {
            "tile": tile,
            "overlap": overlap,
            "ours_s_per_call": round(ours_s, 3),
            "ours_first_call_mb": None if ours_peak is None else round(ours_peak),
            "ours_calls": ours_calls,
            "ours_waste": round(ours_calls * size_h * size_w / (width * height), 3),
            # Tiles shrunk to fit the scan cost their area's share of the full tile's call.
            "ours_s_per_mp": round(ours_s * ours_calls * size_h * size_w / side**2 / mp, 2),
            "upstream_s_per_call": round(up_s, 3),
            "upstream_first_call_mb": None if up_peak is None else round(up_peak),
            "upstream_waste": round(up_area / (width * height), 3),
            "upstream_s_per_mp": round(up_s * up_area / pad**2 / mp, 2),
        }
        row["vs_upstream"] = round(row["upstream_s_per_mp"] / row["ours_s_per_mp"], 2)
        rows.append(row)
        print(
            f"{name:<13} tile {tile:>4}: ours {choice} {row['ours_s_per_mp']:>8} s/MP "
            f"(waste {row['ours_waste']}x, {ours_s:.2f} s a call, first call "
            f"+{row['ours_first_call_mb']} MB); upstream {row['upstream_s_per_mp']:>8} s/MP "
            f"(waste {row['upstream_waste']}x); {row['vs_upstream']}x",
            flush=True,
        )
    return {
        "engine": choice,
        "precision": params["precision"],
        "first_use_s": round(first_use, 1),
        "calibration": params.get("engine_calibration"),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="x4plus,general-x4v3")
    parser.add_argument("--tiles", default="256,384,512")
    parser.add_argument("--scan", default="3000x2000", help="WIDTHxHEIGHT of the whole scan")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"Error: {SHARED} (real weights and photos) is not present", file=sys.stderr)
        return 2
    import torch

    width, _, height = args.scan.partition("x")
    scan = (int(width), int(height))
    tiles = [int(t) for t in args.tiles.split(",")]
    print(f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, "
          f"scan {scan[0]}x{scan[1]}, tiles cut from {PHOTO}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="scanrestore-tiles-") as tmp:
        models = {
            name: bench_model(name, tiles, scan, Path(tmp)) for name in args.models.split(",")
        }
    result = {
        "command": " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "scan": list(scan),
        "models": models,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
