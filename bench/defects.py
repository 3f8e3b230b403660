"""Dust and scratch repair on real damaged photos, and its memory on a large scan.

    .venv/bin/python bench/defects.py sheet [--detector learned] [--out bench/results] [--row STEM]
    .venv/bin/python bench/defects.py rss [--detector learned] [--megapixels 50]
    (--model WEIGHTS and --threshold T choose the learned detector's weights and cut-off)

- sheet: the restore stage (colour off, the chosen detector) on the real damaged photos in
  ../shared/corpus/old_photos (historic and real_degraded): for each, the share of pixels
  repaired and the seconds taken; a contact sheet (before, mask, after) of the eight with the
  most repaired pixels, at their busiest 256 px window, as defects_sheet_<detector>.png, and the
  numbers as defects_<detector>.json. --row STEM also writes that photo's row alone as a small
  JPEG, defects-row-<detector>.jpg (the README shows it; git keeps it).
- rss: one fresh process restores a synthetic scan of --megapixels (a corpus photo enlarged,
  with seeded scratches and specks drawn on it) and reports its peak RSS (ru_maxrss) and the
  baseline after imports: the acceptance bound is 2 GB on a 50 MP scan.
Exits 2 where ../shared is absent.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.quality import as_bgr8, busiest_window  # noqa: E402
from pipeline.image import decode  # noqa: E402
from pipeline.models import ModelStore  # noqa: E402
from pipeline.stage import StageContext  # noqa: E402
from pipeline.stages.restore import RestoreOptions, RestoreStage  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
OLD = CORPUS / "old_photos"
CELL = 256
SHOWN = 8


def stage_for(detector: str, model: str | None = None, threshold: float = 0.5) -> RestoreStage:
    extra = {"detector_model": model} if model else {}
    return RestoreStage(
        RestoreOptions(colour=False, detector=detector, threshold=threshold, **extra)
    )


def context(cache: Path) -> StageContext:
    return StageContext(models=ModelStore(cache), device="cpu", precision="fp32")


def sheet(
    detector: str, out: Path, model: str | None, threshold: float, row: str | None = None
) -> dict[str, Any]:
    paths = sorted(p for p in OLD.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"no photos under {OLD}")
    stage = stage_for(detector, model, threshold)
    rows, cells = [], []
    with tempfile.TemporaryDirectory() as cache:
        ctx = context(Path(cache))
        for path in paths:
            image = decode(path)
            started = time.perf_counter()
            result = stage.run(image, ctx)
            seconds = time.perf_counter() - started
            mask = (
                np.zeros(image.pixels.shape[:2], np.uint8) if result.mask is None else result.mask
            )
            share = float(np.mean(mask > 0))
            dust = result.params.get("dust") or {}
            rows.append({
                "image": str(path.relative_to(CORPUS)),
                "size": [image.width, image.height],
                "repaired_share": share,
                "defects": dust.get("defects"),
                "seconds": seconds,
            })  # fmt: skip
            # A photo no larger than a cell is shown from its corner.
            y, x = busiest_window(mask > 0, CELL) if min(mask.shape) > CELL else (0, 0)
            window = (slice(y, y + CELL), slice(x, x + CELL))
            cells.append((share, path.stem, image.pixels[window], mask[window],
                          result.image.pixels[window]))  # fmt: skip
            print(f"  {path.name}: {share:.2%} repaired, {seconds:.1f} s", file=sys.stderr)
    chosen = sorted(cells, key=lambda c: -c[0])[:SHOWN]
    out.mkdir(parents=True, exist_ok=True)
    picture = out / f"defects_sheet_{detector}.png"
    cv2.imwrite(str(picture), render(chosen, detector))
    report = {"detector": detector, "images": rows, "sheet": str(picture),
              "shown": [c[1] for c in chosen]}  # fmt: skip
    if row is not None:
        named = [c for c in cells if c[1] == row]
        if not named:
            raise SystemExit(f"--row {row}: no such photo under {OLD}")
        report["row"] = str(out / f"defects-row-{detector}.jpg")
        cv2.imwrite(report["row"], render(named, detector), [cv2.IMWRITE_JPEG_QUALITY, 88])
    (out / f"defects_{detector}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def render(chosen: list[tuple], detector: str) -> np.ndarray:
    gap, label = 4, 18
    width = gap + 3 * (CELL + gap)
    canvas = np.full((gap + len(chosen) * (CELL + label + gap), width, 3), 32, np.uint8)
    for r, (share, name, before, mask, after) in enumerate(chosen):
        top = gap + r * (CELL + label + gap)
        for c, (title, pixels) in enumerate(
            ((f"{name} before", before), (f"mask ({detector}) {share:.2%}", mask), ("after", after))
        ):
            left = gap + c * (CELL + gap)
            cv2.putText(canvas, title, (left + 2, top + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        (220, 230, 255), 1, cv2.LINE_AA)  # fmt: skip
            tile = as_bgr8(pixels if pixels.dtype != np.uint8 else pixels / 255.0)
            y0 = top + label
            canvas[y0 : y0 + tile.shape[0], left : left + tile.shape[1]] = tile
    return canvas


def rss(detector: str, megapixels: float, model: str | None, threshold: float) -> dict[str, Any]:
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    photo = decode(CORPUS / "sr_benchmark" / "skimage_cc0_HR" / "coffee.png")
    source = photo.pixels
    height = round(float(np.sqrt(megapixels * 1e6 * 2 / 3)))
    width = round(height * 1.5)
    pixels = cv2.resize(source[:, :, :3], (width, height), interpolation=cv2.INTER_LINEAR)
    rng = np.random.default_rng(0)
    for _ in range(400):  # seeded scratches and specks, drawn band-free on the big scan
        x, y = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        if rng.random() < 0.3:
            end = (x + int(rng.normal(0, 400)), y + int(rng.normal(0, 400)))
            cv2.line(pixels, (x, y), end, (0.95, 0.95, 0.95), int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            cv2.circle(pixels, (x, y), int(rng.integers(1, 5)), (0.05, 0.05, 0.05), -1)
    image_mb = pixels.nbytes / 2**20
    with tempfile.TemporaryDirectory() as cache:
        ctx = StageContext(models=ModelStore(Path(cache)), device="cpu", precision="fp32",
                           scratch_dir=Path(cache))  # fmt: skip
        image = photo.replace(pixels=pixels)
        del source, photo
        started = time.perf_counter()
        result = stage_for(detector, model, threshold).run(image, ctx)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dust = result.params.get("dust") or {}
    return {
        "detector": detector,
        "size": [width, height],
        "megapixels": width * height / 1e6,
        "input_mb": image_mb,
        "baseline_mb": baseline,
        "peak_rss_mb": peak,
        "seconds": seconds,
        "repaired_pixels": dust.get("repaired_pixels"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("sheet", "rss"))
    parser.add_argument("--detector", choices=("learned", "classic"), default="learned")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--megapixels", type=float, default=50.0)
    parser.add_argument("--model", help="learned detector weights (id or path; default shipped)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--row", help="sheet: also write this photo's row (file stem) alone")
    args = parser.parse_args(argv)
    if not CORPUS.exists():
        print(f"{CORPUS} is absent", file=sys.stderr)
        return 2
    if args.what == "sheet":
        report = sheet(args.detector, args.out, args.model, args.threshold, args.row)
        for row in report["images"]:
            print(f"{row['image']:<55} {row['repaired_share']:>7.2%} {row['seconds']:>6.1f} s")
        print(f"sheet: {report['sheet']} ({', '.join(report['shown'])})")
    else:
        report = rss(args.detector, args.megapixels, args.model, args.threshold)
        print(json.dumps(report, indent=1))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"defects_rss_{args.detector}.json").write_text(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
