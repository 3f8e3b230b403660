"""Workers and engine threads: how to split the CPU's cores between the daemon's worker
processes ([daemon].workers) and each worker's inference threads ([processing].threads).

    python bench/split.py [--model general-x4v3] [--crop 512] [--images 4] [--tile 256]
        [--splits 1x2,2x1] [--out bench/results/split.json]

For each split WxT, W fresh processes with T threads each upscale the same real crops through
the upscale stage (engine auto, so each process calibrates for its own thread count during a
warm-up image before the clock starts), all started together. Images per hour count every
image finished between the common start and the last process's end. Peak RSS is per process
(the machine needs W times that). Prints a table and writes JSON. The machine may be shared:
compare the splits within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # runnable as a script from a plain checkout

SHARED = REPO.parent / "shared"
WEIGHTS = {
    "general-x4v3": SHARED / "weights/realesr-general-x4v3.from-ncnn.pth",
    "x4plus": SHARED / "weights/RealESRGAN_x4plus.from-ncnn.pth",
}
PHOTOS = (
    "corpus/old_photos/historic/bop_old_b.png",
    "corpus/old_photos/historic/bop_old_c.png",
    "corpus/old_photos/historic/bop_old_d.png",
    "corpus/sr_benchmark/Set14/HR/barbara.png",
)
DEFAULT_OUT = REPO / "bench/results/split.json"


def parse_splits(text: str) -> list[tuple[int, int]]:
    """ "1x2,2x1" -> [(1, 2), (2, 1)]: workers x threads."""
    splits = []
    for part in text.split(","):
        workers, _, threads = part.strip().partition("x")
        if not (workers.isdigit() and threads.isdigit()) or "0" in (workers, threads):
            raise argparse.ArgumentTypeError(f"split {part!r}: expected WORKERSxTHREADS, e.g. 2x1")
        splits.append((int(workers), int(threads)))
    return splits


def crops(size: int, count: int) -> list[Any]:
    """`count` real 8-bit photos, centre crops of `size` px, cycling through PHOTOS."""
    import numpy as np

    from pipeline.image import decode

    images = []
    for index in range(count):
        image = decode(SHARED / PHOTOS[index % len(PHOTOS)])
        top = max(0, (image.height - size) // 2)
        left = max(0, (image.width - size) // 2)
        pixels = np.ascontiguousarray(image.pixels[top : top + size, left : left + size])
        images.append(image.replace(pixels=pixels))
    return images


def child(args: argparse.Namespace) -> None:
    """One worker: warm up (conversions, calibration), say ready, wait for go, time each image."""
    import torch

    from pipeline.models import ModelStore
    from pipeline.runtimes.calibration import peak_rss_mb
    from pipeline.stage import StageContext
    from pipeline.stages.upscale import UpscaleOptions, UpscaleStage

    torch.set_num_threads(args.threads)
    images = crops(args.crop, args.images)
    ctx = StageContext(models=ModelStore(Path(args.cache)), device="cpu")
    options = UpscaleOptions(model=str(WEIGHTS[args.model]), tile=args.tile, engine="auto")
    stage = UpscaleStage(options)
    warm = stage.run(images[0], ctx)
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # go
    seconds = []
    for image in images:
        start = time.perf_counter()
        stage.run(image, ctx)
        seconds.append(time.perf_counter() - start)
    calibration = warm.params.get("engine_calibration", {})
    report = {
        "seconds": seconds,
        "finished": time.time(),
        "engine": warm.params["engine"],
        "precision": warm.params["precision"],
        "choice": calibration.get("choice"),
        "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(report), flush=True)


def run_split(args: argparse.Namespace, workers: int, threads: int, cache: Path) -> dict:
    """Start `workers` children, release them together, gather their reports."""
    command = [
        sys.executable, __file__, "--child", "--threads", str(threads), "--model", args.model,
        "--crop", str(args.crop), "--images", str(args.images), "--tile", str(args.tile),
        "--cache", str(cache),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    children = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(workers)
    ]
    try:
        for process in children:
            line = process.stdout.readline()
            if not line or not json.loads(line).get("ready"):
                raise RuntimeError(f"split {workers}x{threads}: a worker failed to warm up")
        started = time.time()
        for process in children:
            process.stdin.write("go\n")
            process.stdin.flush()
        reports = [json.loads(process.stdout.readline()) for process in children]
    finally:
        for process in children:  # finished when all went well; stopped otherwise
            if process.poll() is None:
                process.kill()
            process.wait()
    wall = max(report["finished"] for report in reports) - started
    images = workers * args.images
    return {
        "workers": workers,
        "threads": threads,
        "images": images,
        "wall_s": round(wall, 2),
        "images_per_hour": round(images * 3600 / wall, 1),
        "seconds_per_image": [round(s, 2) for r in reports for s in r["seconds"]],
        "engines": sorted({f"{r['choice'] or r['engine']} ({r['precision']})" for r in reports}),
        "peak_rss_mb_per_worker": max(r["peak_rss_mb"] or 0 for r in reports),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(WEIGHTS), default="general-x4v3")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--images", type=int, default=4, help="timed images per worker")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--splits", type=parse_splits, default=None, help="e.g. 1x2,2x1")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the splits")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if not SHARED.is_dir():
        print(f"Error: {SHARED} (real weights and photos) is not present", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    splits = args.splits or sorted({(w, cores // w) for w in range(1, cores + 1) if cores % w == 0})
    rows = []
    with tempfile.TemporaryDirectory(prefix="scanrestore-split-") as tmp:
        cache = Path(tmp) / "models"  # shared: converted once, one decision per thread count
        for round_ in range(args.rounds):  # interleaved, so each ratio compares nearby passes
            for workers, threads in splits:
                row = run_split(args, workers, threads, cache) | {"round": round_}
                print(
                    f"{workers}x{threads}: {row['images_per_hour']:8.1f} images/h "
                    f"({row['wall_s']} s for {row['images']}), {', '.join(row['engines'])}, "
                    f"peak {row['peak_rss_mb_per_worker']} MB a worker",
                    flush=True,
                )
                rows.append(row)
    best = {}
    for row in rows:
        key = f"{row['workers']}x{row['threads']}"
        best[key] = max(best.get(key, 0), row["images_per_hour"])
    print("\nbest of rounds, images/h: " + ", ".join(f"{k} {v}" for k, v in best.items()))
    result = {
        "command": " ".join(sys.argv),
        "machine": {"cpu": platform.processor(), "cores": cores},
        "model": args.model,
        "crop": args.crop,
        "tile": args.tile,
        "rows": rows,
        "best_images_per_hour": best,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
