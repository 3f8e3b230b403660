"""Peak memory of the review page's server previewing a large output.

    .venv/bin/python bench/preview_rss.py [--megapixels 100] [--scale 2]
        [--format png|jpeg|webp|tiff] [--dir /tmp] [--keep]
        [--out bench/results/preview_rss_FORMAT.json]

An output of `--megapixels` (a smooth gradient with noise so it compresses like a photograph:
8-bit RGB PNG, JPEG or WebP, or with `--format tiff` a 16-bit RGB tiled Deflate TIFF as
archival outputs are; every format scanrestore writes) and its original at 1/`--scale` the
size are written, and recorded as one done run through the public store methods
(observation, recipe, run with its output). Then a real
`scanrestore serve` process is started over that state folder and asked, as the output page
asks: the output's overview, a native-resolution crop at 100 % (1600x1000), the Lanczos
view's overview and crop, the original's crop. Reported: the server's resident memory after
start-up (VmRSS), its peak (VmHWM, from /proc) after every request, each request's seconds,
and the preview cache's size on disk. The issue's bound: the peak stays under 1 GB (also at
200 MP: no image is decoded whole).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.store import OutputFile, open_database  # noqa: E402
from pipeline.files import sha256_file  # noqa: E402

_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "tiff": ".tif"}


def _tiff(path: Path, width: int, height: int, seed: int) -> None:
    """16-bit, 256x256 tiles, Deflate: what scanrestore writes for a TIFF output."""
    import tifffile

    rng = np.random.default_rng(seed)
    xs = np.linspace(0, 65535, width, dtype=np.float32)

    def tiles():
        for top in range(0, height, 256):
            rows = min(256, height - top)
            ys = np.linspace(top, top + rows, rows, dtype=np.float32)[:, None] * 65535 / height
            band = np.stack([np.broadcast_to(xs, (rows, width)), np.broadcast_to(ys, (rows, width)),
                             (xs[None, :] + ys) / 2], axis=-1)  # fmt: skip
            band += rng.normal(0, 1500, band.shape).astype(np.float32)
            band = np.clip(band, 0, 65535).astype(np.uint16)
            padded = np.zeros((256, -(-width // 256) * 256, 3), np.uint16)
            padded[:rows, :width] = band
            for left in range(0, width, 256):
                yield padded[:, left : left + 256]

    tifffile.imwrite(
        path, tiles(), shape=(height, width, 3), dtype=np.uint16, photometric="rgb",
        tile=(256, 256), compression="zlib", compressionargs={"level": 1},
    )  # fmt: skip


def _image(path: Path, width: int, height: int, seed: int) -> None:
    """A PNG, JPEG or WebP (from the suffix) made by libvips as it streams to disk, so this
    script stays small too."""
    import pyvips

    xy = pyvips.Image.xyz(width, height)
    x, y = xy[0] * (255 / width), xy[1] * (255 / height)
    noise = pyvips.Image.gaussnoise(width, height, sigma=6, mean=0, seed=seed)
    image = (x.bandjoin([y, (x + y) / 2]) + noise).cast("uchar").copy(interpretation="srgb")
    options = {".png": {"compression": 1}, ".jpg": {"Q": 92}, ".webp": {"Q": 90}}
    image.write_to_file(str(path), **options[path.suffix])


def _record(state: Path, scans: Path, out: Path, source: Path, output: Path) -> None:
    store = open_database(state / "scanrestore.db")
    try:
        sha = sha256_file(source)
        store.record_observation(source.name, sha, size=source.stat().st_size)
        recipe = store.record_recipe({"stages": [{"stage": "upscale"}], "bench": "preview_rss"})
        now = datetime.now(UTC)
        store.record_run(
            source_sha256=sha,
            path=source.name,
            recipe_sha256=recipe,
            status="done",
            started_at=now,
            finished_at=now,
            code_version="bench",
            outputs=[
                OutputFile(output.name, 1, sha256_file(output), output.stat().st_size, "image")
            ],
        )
    finally:
        store.close()


def _memory(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=100.0)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--format", choices=tuple(_SUFFIXES), default="png")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, help="default bench/results/preview_rss_FORMAT.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="preview-rss-", dir=args.dir))
    scans, out, state = root / "scans", root / "out", root / "state"
    for folder in (scans, out, state):
        folder.mkdir()
    aspect = 1.25 if args.format == "webp" else 1.5  # WebP's sides end at 16383
    height = round((args.megapixels * 1e6 / aspect) ** 0.5)
    width = round(height * aspect)
    width, height = width - width % args.scale, height - height % args.scale
    started = time.monotonic()
    suffix = _SUFFIXES[args.format]
    source, output = scans / f"scan{suffix}", out / f"scan.v1{suffix}"
    make = _tiff if args.format == "tiff" else _image
    make(source, width // args.scale, height // args.scale, seed=1)
    make(output, width, height, seed=2)
    _record(state, scans, out, source, output)
    made = time.monotonic() - started
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = root / "config.toml"
    config.write_text(
        f'[watch]\ninput = "{scans}"\noutput = "{out}"\n[daemon]\nstate_dir = "{state}"\n'
        f"[image]\nmax_pixels = {max(200_000_000, width * height)}\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(config), "serve", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    results: dict[str, object] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/api/status", timeout=30).raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        results["after_start"] = _memory(server.pid)
        x, y = width // 2, height // 2
        crop = f"x={x}&y={y}&w=1600&h=1000"
        requests = {
            "output_overview": "image/output?width=2048",
            "output_crop_100": f"image/output?{crop}",
            "lanczos_overview": "image/lanczos?width=2048",
            "lanczos_crop_100": f"image/lanczos?{crop}",
            "original_crop_100": f"image/original?{crop}",
            "output_overview_again": "image/output?width=1024",
        }
        for name, path in requests.items():
            begun = time.monotonic()
            answer = httpx.get(f"{url}/api/outputs/1/{path}", timeout=600)
            answer.raise_for_status()
            results[name] = {"seconds": round(time.monotonic() - begun, 3), **_memory(server.pid)}
            print(f"{name}: {results[name]}", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    cache = sum(p.stat().st_size for p in (state / "previews").glob("*") if p.is_file())
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    peak = max(v["VmHWM"] for v in results.values() if isinstance(v, dict) and "VmHWM" in v)
    report = {
        "megapixels": round(width * height / 1e6, 1),
        "format": args.format,
        "output_size": [width, height],
        "original_size": [width // args.scale, height // args.scale],
        "seconds_to_make_images": round(made, 1),
        "peak_rss_bytes": peak,
        "peak_rss_under_1gb": peak < 1 << 30,
        "preview_cache_bytes": cache,
        "requests": results,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("megapixels", "format", "peak_rss_bytes", "preview_cache_bytes")
            }
        )
    )
    out_file = args.out or REPO / f"bench/results/preview_rss_{args.format}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
