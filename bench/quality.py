"""Quality harness on ../shared/corpus: how much each stage improves real photos, and at what cost.

    .venv/bin/python bench/quality.py [--sections denoise,restore,upscale] [--quick] [--pairs N]
        [--out bench/results/quality.json] [--sheet bench/results/quality_sheet.png]
        [--detector-model ID_OR_PATH] [--threshold T]   (the restore sections' learned detector)

- denoise: every PolyU real high-ISO pair (noisy `*_real`, clean `*_mean`), PSNR and SSIM of the
  noisy input and of each method's output against the clean image.
- restore: seeded synthetic scratches, specks and grain drawn on Set5/Set14 ground truth; PSNR
  in the damaged region, outside it and whole, before and after the stage's defaults; detection
  recall/precision of its mask; how much the defaults move clean images (noise-free, and with
  grain only).
- upscale: Set5, Set14 and City100 (NikonD5500 real pairs) low-res inputs through bicubic,
  Lanczos and each 4x model: PSNR and SSIM on the BT.601 Y channel with 4 px shaved, and
  sharpness (mean gradient magnitude relative to the high-res image's).

Prints tables, writes JSON (the command, the commit, every corpus file and model with its
SHA-256, per-image and mean numbers) and a contact sheet of before/after crops.
Exits 2 where ../shared is absent. `--quick` runs one small crop per data set (CI smoke test).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.files import sha256_file  # noqa: E402
from pipeline.image import Image, decode  # noqa: E402
from pipeline.models import ModelStore  # noqa: E402
from pipeline.stage import StageContext, StageResult  # noqa: E402
from pipeline.stages.denoise import DenoiseOptions, DenoiseStage  # noqa: E402
from pipeline.stages.restore import RestoreOptions, RestoreStage  # noqa: E402
from pipeline.stages.upscale import UpscaleOptions, UpscaleStage  # noqa: E402

SHARED = REPO.parent / "shared"
CORPUS = SHARED / "corpus"
WEIGHTS = SHARED / "weights"
POLYU = CORPUS / "real_lr_hr_pairs" / "PolyU_real_noise"
SET5 = CORPUS / "sr_benchmark" / "Set5"
SET14 = CORPUS / "sr_benchmark" / "Set14"
CITY100 = CORPUS / "real_lr_hr_pairs" / "City100_NikonD5500"
SECTIONS = ("denoise", "restore", "upscale")
# Run only when named: the restore section with each dust detector forced, side by side.
EXTRA_SECTIONS = ("restore-classic", "restore-learned")

SCALE = 4
SHAVE = 4  # border pixels left out of PSNR/SSIM, as the SR literature does at x4
UPSCALE_MODELS = {
    "general-x4v3": WEIGHTS / "realesr-general-x4v3.from-ncnn.pth",
    "x4plus": WEIGHTS / "RealESRGAN_x4plus.from-ncnn.pth",
}
# City100's L frames are registered to the H frames' pixel grid, so their pixel ratio is 1; the
# ratio of detail is searched over this range (see city100_ratio).
CITY100_RATIOS = np.round(np.arange(2.0, 4.51, 0.1), 1)
SHEET_CELL = 160  # contact-sheet crop size in pixels (at the high-res / output scale)
SHEET_UPSCALE = ("Set14/comic", "City100/001")  # the upscale rows of the sheet, where run
SHEET_RESTORE = ("Set5/bird", "Set14/lenna")
# Synthetic print damage: film grain over the whole scan (so that "outside the damage" has a
# finite PSNR before restoring too), and a pixel counts as damaged where the drawn defects moved
# it by more than VISIBLE.
GRAIN_SIGMA = 2 / 255
VISIBLE = 2 / 255
REGION_PX = 2  # the damaged region is the damage dilated by this many pixels


@dataclass(frozen=True)
class Plan:
    """How much of the corpus a run reads: all of it, or a small crop of each set (--quick)."""

    denoise_pairs: int | None = None
    denoise_crop: int | None = None  # centre crop of each PolyU pair
    sr_images: int | None = None  # first N of Set5 and of Set14
    sr_lr_crop: int | None = None  # centre crop of each Set5/Set14 low-res input
    city_pairs: int = 10
    city_crop: int = 480  # centre crop of each City100 pair, at the high-res size
    restore_crop: int | None = None  # centre crop of each Set5/Set14 image for restore


FULL = Plan()
QUICK = Plan(
    denoise_pairs=1,
    denoise_crop=192,
    sr_images=1,
    sr_lr_crop=48,
    city_pairs=1,
    city_crop=192,
    restore_crop=192,
)


class Corpus:
    """Reads images from ../shared and remembers each file used, with its SHA-256."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}

    def read(self, path: Path) -> Image:
        image = decode(path)
        self.files[str(path.relative_to(SHARED))] = sha256_file(path)
        return image


@dataclass
class Run:
    """What every section shares: the stage context, the corpus log, models used, sheet rows."""

    ctx: StageContext
    plan: Plan
    corpus: Corpus = field(default_factory=Corpus)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    sheet: list[SheetRow] = field(default_factory=list)
    restore: dict[str, Any] = field(default_factory=dict)  # restore option overrides

    def note_model(self, method: str, result: StageResult) -> None:
        keys = ("model", "model_sha256", "architecture", "precision", "tile", "device")
        params = {key: result.params[key] for key in keys if key in result.params}
        if "model" in params:
            self.models.setdefault(method, params)


# --- metrics ---------------------------------------------------------------------------------


def _db(mse: float) -> float | None:
    """PSNR of an 8-bit mean squared error; None where the images are identical."""
    return None if mse == 0 else float(10 * np.log10(255**2 / mse))


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float | None:
    """PSNR over all channels after 8-bit rounding, optionally only where `where` (H, W) holds."""
    diff = (np.rint(a * 255) - np.rint(b * 255)) ** 2
    if where is not None:
        diff = diff[where.astype(bool)]
    return _db(float(np.mean(diff)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over channels (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5)."""
    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for x, y in zip(np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0), strict=True):
        x, y = x.astype(np.float64), y.astype(np.float64)

        def blur(v: np.ndarray) -> np.ndarray:
            return cv2.GaussianBlur(v, (11, 11), 1.5)

        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        num = (2 * mx * my + c1) * (2 * cov + c2)
        den = (mx**2 + my**2 + c1) * (vx + vy + c2)
        scores.append(float(np.mean(num / den)))
    return float(np.mean(scores))


def luma(pixels: np.ndarray) -> np.ndarray:
    """BT.601 Y in [16, 235] of the 8-bit rounded image (MATLAB's rgb2ycbcr, as SR papers use)."""
    rgb = np.rint(np.clip(pixels, 0, 1) * 255)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    return 16 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255


def _shaved(plane: np.ndarray) -> np.ndarray:
    return plane[SHAVE:-SHAVE, SHAVE:-SHAVE]


def gradient(pixels: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of the Y channel."""
    y = luma(pixels)
    return np.hypot(cv2.Sobel(y, cv2.CV_64F, 1, 0), cv2.Sobel(y, cv2.CV_64F, 0, 1))


def sr_scores(out: np.ndarray, high: np.ndarray) -> dict[str, float | None]:
    """PSNR and SSIM on Y with the border shaved, and sharpness: the output's mean gradient over
    the high-res image's (1 is as much edge energy as the truth; above 1, invented or noise)."""
    y_out, y_high = _shaved(luma(out)), _shaved(luma(high))
    return {
        "psnr_y": _db(float(np.mean((y_out - y_high) ** 2))),
        "ssim_y": ssim(y_out[..., None] / 255, y_high[..., None] / 255),
        "sharpness": float(np.mean(_shaved(gradient(out))) / np.mean(_shaved(gradient(high)))),
    }


# --- images ----------------------------------------------------------------------------------


def resize(pixels: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """cv2.resize to (width, height), keeping the channel axis and the [0, 1] range."""
    out = cv2.resize(pixels, size, interpolation=interpolation)
    return np.clip(out.reshape(size[1], size[0], pixels.shape[2]), 0, 1)


def centre_crop(pixels: np.ndarray, height: int | None, width: int | None = None) -> np.ndarray:
    if height is None:
        return pixels
    width = height if width is None else width
    top, left = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
    return pixels[max(top, 0) : max(top, 0) + height, max(left, 0) : max(left, 0) + width]


def busiest_window(weight: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the size x size window with the largest sum of `weight` (H, W)."""
    size = min(size, *weight.shape)
    total = cv2.integral(weight.astype(np.float64))
    sums = total[size:, size:] - total[:-size, size:] - total[size:, :-size] + total[:-size, :-size]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(top), int(left)


def crop_at(pixels: np.ndarray, corner: tuple[int, int], size: int = SHEET_CELL) -> np.ndarray:
    return pixels[corner[0] : corner[0] + size, corner[1] : corner[1] + size]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "inf" if value is None else f"{value:.{digits}f}"


# --- contact sheet ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SheetRow:
    """One row of the contact sheet: a caption over labelled crops of the same place."""

    caption: str
    cells: list[tuple[str, np.ndarray]]


_FONT = cv2.FONT_HERSHEY_SIMPLEX
_GAP, _LABEL_H, _CAPTION_H = 4, 16, 20


def as_bgr8(pixels: np.ndarray) -> np.ndarray:
    rgb = np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    return np.ascontiguousarray(rgb[..., ::-1])


def render_sheet(rows: list[SheetRow], path: Path) -> dict[str, Any]:
    """Draw the rows into one PNG: a caption strip per row, a label strip over each crop."""
    columns = max(len(row.cells) for row in rows)
    width = _GAP + columns * (SHEET_CELL + _GAP)
    row_h = _CAPTION_H + _LABEL_H + SHEET_CELL + _GAP
    canvas = np.full((_GAP + len(rows) * row_h, width, 3), 32, np.uint8)
    for r, row in enumerate(rows):
        top = _GAP + r * row_h
        cv2.putText(
            canvas, row.caption, (_GAP, top + 14), _FONT, 0.45, (255, 255, 255), 1, cv2.LINE_AA
        )
        for c, (label, pixels) in enumerate(row.cells):
            left = _GAP + c * (SHEET_CELL + _GAP)
            cv2.putText(
                canvas,
                label,
                (left + 2, top + _CAPTION_H + 12),
                _FONT,
                0.38,
                (200, 230, 255),
                1,
                cv2.LINE_AA,
            )
            tile = as_bgr8(pixels)[:SHEET_CELL, :SHEET_CELL]
            y0 = top + _CAPTION_H + _LABEL_H
            canvas[y0 : y0 + tile.shape[0], left : left + tile.shape[1]] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return {"path": str(path), "bytes": path.stat().st_size, "rows": [r.caption for r in rows]}


# --- denoise ---------------------------------------------------------------------------------


def denoise_methods() -> dict[str, DenoiseStage]:
    return {
        "nlm h=8": DenoiseStage(DenoiseOptions(method="nlm", h=8)),
        "nlm h=8 strength 0.5": DenoiseStage(DenoiseOptions(method="nlm", h=8, strength=0.5)),
        "dncnn colour blind": DenoiseStage(
            DenoiseOptions(method="dncnn", model=str(WEIGHTS / "dncnn_color_blind.pth"))
        ),
    }


def bench_denoise(run: Run) -> dict[str, Any]:
    rows = []
    methods = denoise_methods()
    crop = run.plan.denoise_crop
    for noisy_path in sorted(POLYU.glob("*_real.JPG"))[: run.plan.denoise_pairs]:
        noisy = run.corpus.read(noisy_path)
        noisy = noisy.replace(pixels=centre_crop(noisy.pixels, crop))
        clean_path = noisy_path.with_name(noisy_path.name.replace("_real.", "_mean."))
        clean = centre_crop(run.corpus.read(clean_path).pixels, crop)
        row = {
            "pair": noisy_path.name.removesuffix("_real.JPG"),
            "noisy": {"psnr": psnr(noisy.pixels, clean), "ssim": ssim(noisy.pixels, clean)},
        }
        outputs = {"noisy": noisy.pixels}
        for name, stage in methods.items():
            started = time.perf_counter()
            result = stage.run(noisy, run.ctx)
            run.note_model(name, result)
            outputs[name] = result.image.pixels
            row[name] = {
                "psnr": psnr(outputs[name], clean),
                "ssim": ssim(outputs[name], clean),
                "seconds": time.perf_counter() - started,
            }
        if not rows:
            run.sheet.append(_denoise_sheet_row(row, outputs, clean))
        rows.append(row)
        print(f"  denoise {row['pair']}", file=sys.stderr)
    return {
        "data": str(POLYU.relative_to(SHARED)),
        "crop": f"centre {crop}x{crop}" if crop else None,
        "pairs": rows,
        "mean": summarise(rows, "pair", ("psnr", "ssim")),
    }


def _denoise_sheet_row(row: dict, outputs: dict[str, np.ndarray], clean: np.ndarray) -> SheetRow:
    corner = busiest_window(gradient(clean), SHEET_CELL)
    cells = [
        (f"{name} {_fmt(row[name]['psnr'], 1)} dB", crop_at(pixels, corner))
        for name, pixels in outputs.items()
    ]
    cells.append(("clean (mean of shots)", crop_at(clean, corner)))
    return SheetRow(f"denoise: PolyU {row['pair']}", cells)


def summarise(rows: list[dict], key: str, metrics: Iterable[str]) -> dict[str, dict[str, float]]:
    """Mean of each metric per method over `rows` (each row: {key: name, method: {metric}})."""
    names = [name for name in rows[0] if name != key]
    return {
        name: {metric: float(np.mean([row[name][metric] for row in rows])) for metric in metrics}
        for name in names
    }


def print_denoise(section: dict[str, Any]) -> None:
    summary = section["mean"]
    print(
        f"\ndenoise, PolyU real noise, {len(section['pairs'])} pairs "
        "(mean against the clean image):"
    )
    print(f"{'method':<24}{'PSNR dB':>9}{'gain dB':>9}{'SSIM':>8}")
    for name, scores in summary.items():
        gain = scores["psnr"] - summary["noisy"]["psnr"]
        print(f"{name:<24}{scores['psnr']:>9.2f}{gain:>+9.2f}{scores['ssim']:>8.4f}")


# --- restore ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Damage:
    """A clean image with seeded synthetic print damage drawn on it."""

    pixels: np.ndarray  # clean + defects + grain
    grainy: np.ndarray  # clean + the same grain, no defects
    mask: np.ndarray  # bool (H, W): pixels the defects moved by more than VISIBLE
    scratched: np.ndarray  # bool (H, W): the part of `mask` owed mostly to scratches
    darkened: np.ndarray  # bool (H, W): the part of `mask` the defects made darker
    scratches: int
    spots: int


def _scratch(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Opacity (H, W) of a hairline scratch 1-3 px wide: a quadratic Bezier, straight to curved,
    anti-aliased and slightly softened like a scanned one."""
    h, w = shape
    length = rng.uniform(0.15, 0.6) * min(h, w)
    angle = rng.uniform(0, np.pi)
    start = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    bend = rng.uniform(-0.25, 0.25) * length * np.array([-np.sin(angle), np.cos(angle)])
    t = np.linspace(0, 1, 64)[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * ((start + end) / 2 + bend) + t**2 * end
    canvas = np.zeros(shape, np.float32)
    width = int(rng.integers(1, 4))
    curve = np.rint(points * 16).astype(np.int32)  # 4 fractional bits (shift=4)
    cv2.polylines(canvas, [curve], False, 1.0, width, cv2.LINE_AA, shift=4)
    return cv2.GaussianBlur(canvas, (0, 0), 0.5)


def _spot(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Opacity (H, W) of a dust speck of radius 2-6 px, elongated up to 2:1, soft-edged."""
    h, w = shape
    radius = rng.uniform(2, 6)
    centre = np.rint(np.array([rng.uniform(0, w), rng.uniform(0, h)]) * 16).astype(int)
    axes = np.rint(np.array([radius, radius * rng.uniform(0.5, 1.0)]) * 16).astype(int)
    canvas = np.zeros(shape, np.float32)
    angle = rng.uniform(0, 180)
    cv2.ellipse(canvas, tuple(centre), tuple(axes), angle, 0, 360, 1.0, -1, cv2.LINE_AA, 4)
    return cv2.GaussianBlur(canvas, (0, 0), radius / 4)


def damage(clean: np.ndarray, seed: int) -> Damage:
    """Draw bright and dark scratches and specks (their number grows with the area), then add
    grain. The same seed always draws the same damage."""
    rng = np.random.default_rng(seed)
    h, w = clean.shape[:2]
    scratches, spots = 1 + round(h * w / 80_000), 3 + round(h * w / 15_000)
    opacities = [_scratch((h, w), rng) for _ in range(scratches)]
    opacities += [_spot((h, w), rng) for _ in range(spots)]
    damaged = clean.astype(np.float32)
    strongest = np.zeros((2, h, w), np.float32)  # the largest opacity of a scratch, of a speck
    for index, opacity in enumerate(opacities):
        tone = rng.uniform(0.85, 1.0) if rng.random() < 0.5 else rng.uniform(0.0, 0.15)
        alpha = opacity * rng.uniform(0.6, 1.0)
        damaged = damaged * (1 - alpha[..., None]) + tone * alpha[..., None]
        kind = strongest[int(index >= scratches)]
        np.maximum(kind, alpha, out=kind)
    mask = np.max(np.abs(damaged - clean), axis=2) > VISIBLE
    darkened = mask & (np.mean(damaged, axis=2) < np.mean(clean, axis=2))
    grain = rng.normal(0, GRAIN_SIGMA, clean.shape).astype(np.float32)
    return Damage(
        pixels=np.clip(damaged + grain, 0, 1),
        grainy=np.clip(clean + grain, 0, 1),
        mask=mask,
        scratched=mask & (strongest[0] >= strongest[1]),
        darkened=darkened,
        scratches=scratches,
        spots=spots,
    )


def restore_cases(run: Run) -> list[tuple[str, Image]]:
    cases = []
    for folder in (SET5, SET14):
        for path in sorted((folder / "HR").glob("*.png"))[: run.plan.sr_images]:
            image = run.corpus.read(path)
            pixels = centre_crop(image.pixels, run.plan.restore_crop)
            cases.append((f"{folder.name}/{path.stem}", image.replace(pixels=pixels)))
    return cases


def bench_restore(run: Run, detector: str | None = None) -> dict[str, Any]:
    """The restore stage's defaults, or the defaults with `detector` forced (the extra
    sections restore-classic and restore-learned, for a side-by-side table)."""
    stage = RestoreStage(
        RestoreOptions(**run.restore, **({"detector": detector} if detector else {}))
    )
    cases = restore_cases(run)
    shown = {_first_named(cases, prefix, SHEET_RESTORE) for prefix in ("Set5/", "Set14/")}
    rows = [_restore_case(run, stage, name, image, name in shown) for name, image in cases]
    crop = run.plan.restore_crop
    return {
        "options": stage.options.model_dump(),
        "images": rows,
        "crop": f"centre {crop}x{crop}" if crop else None,
        "damage": (
            "seeded per image (crc32 of its name): 1 + area/80000 hairline scratches (quadratic "
            "Bezier, 1-3 px, anti-aliased, Gaussian sigma 0.5) and 3 + area/15000 specks "
            "(ellipses of radius 2-6 px, soft edges), each bright (tone 0.85-1) or dark (0-0.15) "
            f"at opacity 0.6-1; then Gaussian grain sigma {GRAIN_SIGMA * 255:g}/255 everywhere"
        ),
        "definitions": RESTORE_DEFINITIONS,
        "summary": summarise_restore(rows),
    }


RESTORE_DEFINITIONS = {
    "damage": f"pixels the drawn defects moved by more than {VISIBLE * 255:g}/255 in any channel",
    "region": f"the damage dilated by {REGION_PX} px; outside: every other pixel",
    "psnr": "RGB PSNR after 8-bit rounding against the clean image (before: the damaged scan)",
    "recall": "damage pixels inside the stage's mask / damage pixels",
    "recall_scratches": "recall over the damage owed mostly to scratches (the rest: specks)",
    "recall_dark": "recall over the damage the defects made darker (the rest: brighter)",
    "precision": "mask pixels inside the region / mask pixels (None where the mask is empty)",
    "clean_psnr": "PSNR(restore(clean), clean) on the noise-free image; None: left identical",
    "grain_change_db": (
        "PSNR(clean + grain, clean) - PSNR(restore(clean + grain), clean): how many dB restoring "
        "costs a clean scan that has grain but no defects (positive: restoring made it worse)"
    ),
    "outside_drop_db": "PSNR outside the region before restoring minus after",
}


def _first_named(cases: list[tuple[str, Image]], prefix: str, named: Iterable[str]) -> str | None:
    names = [name for name, _ in cases if name.startswith(prefix)]
    chosen = [name for name in names if name in named]
    return (chosen or names or [None])[0]


def _restore_case(
    run: Run, stage: RestoreStage, name: str, image: Image, on_sheet: bool
) -> dict[str, Any]:
    clean = image.pixels
    hurt = damage(clean, zlib.crc32(name.encode()))
    started = time.perf_counter()
    result = stage.run(image.replace(pixels=hurt.pixels), run.ctx)
    seconds = time.perf_counter() - started
    restored = result.image.pixels
    found = np.zeros(clean.shape[:2], bool) if result.mask is None else result.mask > 0
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * REGION_PX + 1,) * 2)
    region = cv2.dilate(hurt.mask.astype(np.uint8), kernel).astype(bool)
    row: dict[str, Any] = {
        "image": name,
        "size": [image.width, image.height],
        "scratches": hurt.scratches,
        "spots": hurt.spots,
        "damaged_fraction": float(hurt.mask.mean()),
        "parts": list(result.params.get("parts", [])),
        "seconds": seconds,
        **_before_after("region", hurt.pixels, restored, clean, region),
        **_before_after("outside", hurt.pixels, restored, clean, ~region),
        **_before_after("whole", hurt.pixels, restored, clean, None),
        "recall": _recall(found, hurt.mask),
        "recall_scratches": _recall(found, hurt.scratched),
        "recall_specks": _recall(found, hurt.mask & ~hurt.scratched),
        "recall_dark": _recall(found, hurt.darkened),
        "recall_bright": _recall(found, hurt.mask & ~hurt.darkened),
        "precision": float(np.mean(region[found])) if found.any() else None,
        **_clean_change(run, stage, image, hurt.grainy),
    }
    row["region_gain_db"] = _minus(row["region_after_db"], row["region_before_db"])
    row["outside_drop_db"] = _minus(row["outside_before_db"], row["outside_after_db"])
    if on_sheet:
        run.sheet.append(_restore_sheet_row(row, hurt, restored, found, clean))
    print(f"  restore {name}", file=sys.stderr)
    return row


def _recall(found: np.ndarray, truth: np.ndarray) -> float | None:
    return float(np.mean(found[truth])) if truth.any() else None


def _before_after(
    key: str, before: np.ndarray, after: np.ndarray, clean: np.ndarray, where: np.ndarray | None
) -> dict[str, float | None]:
    return {
        f"{key}_before_db": psnr(before, clean, where),
        f"{key}_after_db": psnr(after, clean, where),
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _clean_change(
    run: Run, stage: RestoreStage, image: Image, grainy: np.ndarray
) -> dict[str, Any]:
    """Restore the noise-free image and the grainy one: how much do defaults move clean scans?"""
    clean = image.pixels
    restored = stage.run(image, run.ctx)
    grain_before = psnr(grainy, clean)
    grain_after = psnr(stage.run(image.replace(pixels=grainy), run.ctx).image.pixels, clean)
    changed = np.any(np.rint(restored.image.pixels * 255) != np.rint(clean * 255), axis=2)
    return {
        "clean_psnr": psnr(restored.image.pixels, clean),
        "clean_changed_fraction": float(changed.mean()),
        "clean_parts": list(restored.params.get("parts", [])),
        "grain_before_db": grain_before,
        "grain_after_db": grain_after,
        "grain_change_db": _minus(grain_before, grain_after),
    }


def summarise_restore(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over images, and the worst image for each acceptance number."""

    def values(key: str) -> list[float]:
        return [row[key] for row in rows if row[key] is not None]

    keys = [
        "region_before_db",
        "region_after_db",
        "region_gain_db",
        "outside_before_db",
        "outside_after_db",
        "outside_drop_db",
        "whole_before_db",
        "whole_after_db",
        "recall",
        "recall_scratches",
        "recall_specks",
        "recall_dark",
        "recall_bright",
        "precision",
        "clean_psnr",
        "grain_before_db",
        "grain_after_db",
        "grain_change_db",
        "seconds",
    ]
    summary: dict[str, Any] = {
        f"mean_{key}": float(np.mean(values(key))) if values(key) else None for key in keys
    }
    summary.update(
        worst_region_gain_db=min(values("region_gain_db"), default=None),
        worst_outside_drop_db=max(values("outside_drop_db"), default=None),
        worst_clean_psnr=min(values("clean_psnr"), default=None),
        clean_identical=sum(row["clean_psnr"] is None for row in rows),
        worst_grain_change_db=max(values("grain_change_db"), default=None),
    )
    return summary


def _restore_sheet_row(
    row: dict, hurt: Damage, restored: np.ndarray, found: np.ndarray, clean: np.ndarray
) -> SheetRow:
    corner = busiest_window(hurt.mask.astype(np.float64), SHEET_CELL)
    cells = [
        (f"damaged {_fmt(row['region_before_db'], 1)} dB", crop_at(hurt.pixels, corner)),
        (f"restored {_fmt(row['region_after_db'], 1)} dB", crop_at(restored, corner)),
        ("stage's mask", crop_at(found[..., None].astype(np.float32), corner)),
        ("true damage", crop_at(hurt.mask[..., None].astype(np.float32), corner)),
        ("clean", crop_at(clean, corner)),
    ]
    return SheetRow(f"restore (defaults): {row['image']}, synthetic damage (PSNR in region)", cells)


def print_restore(section: dict[str, Any]) -> None:
    rows, summary = section["images"], section["summary"]
    print(
        f"\nrestore (defaults: {', '.join(p for p in ('colour', 'dust') if section['options'][p])}"
        f"; detector {section['options'].get('detector', 'classic')})"
        f", Set5+Set14, {len(rows)} images, seeded synthetic scratches and specks + grain:"
    )
    print(
        f"{'image':<18}{'region dB':>17}{'gain':>7}{'outside dB':>17}{'drop':>6}"
        f"{'recall':>7}{'prec':>6}{'clean dB':>9}{'grain dB':>16}{'chg':>6}"
    )
    for row in [*rows, {"image": "mean", **_means_as_row(summary)}]:
        print(
            f"{row['image']:<18}{_arrow(row, 'region')}{_fmt(row['region_gain_db']):>7}"
            f"{_arrow(row, 'outside')}{_fmt(row['outside_drop_db']):>6}"
            f"{_share(row['recall']):>7}{_share(row['precision']):>6}"
            f"{_fmt(row['clean_psnr']):>9}"
            f"{_arrow(row, 'grain')}{_fmt(row['grain_change_db']):>6}"
        )
    print(
        f"worst: region gain {_fmt(summary['worst_region_gain_db'])} dB, outside drop "
        f"{_fmt(summary['worst_outside_drop_db'])} dB, clean {_fmt(summary['worst_clean_psnr'])}"
        f" dB ({summary['clean_identical']} left identical), grain change "
        f"{_fmt(summary['worst_grain_change_db'])} dB"
    )
    print(
        f"mean recall over scratches {_share(summary['mean_recall_scratches'])}, over specks "
        f"{_share(summary['mean_recall_specks'])}; over dark damage "
        f"{_share(summary['mean_recall_dark'])}, over bright "
        f"{_share(summary['mean_recall_bright'])}; seconds per damaged image "
        f"{summary['mean_seconds']:.2f}"
    )
    print(
        "region: damage dilated 2 px; clean dB: PSNR(restore(clean), clean), inf = untouched;"
        " grain: a clean scan with grain only, PSNR vs clean before -> after, chg = dB lost by"
        " restoring; prec - : empty mask"
    )


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _arrow(row: dict, key: str) -> str:
    return f"{_fmt(row[f'{key}_before_db']):>8} ->{_fmt(row[f'{key}_after_db']):>6}"


def _means_as_row(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        key.removeprefix("mean_"): value
        for key, value in summary.items()
        if key.startswith("mean_")
    }


# --- upscale ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SrCase:
    """A low-res model input and the high-res truth its 4x (or resized) output is judged by."""

    set: str
    name: str
    low: Image
    high: np.ndarray
    how: dict[str, Any]  # how the pair was made: source files, crops, resizing


def set5_cases(run: Run) -> list[SrCase]:
    cases = []
    for high_path in sorted((SET5 / "HR").glob("*.png"))[: run.plan.sr_images]:
        low_path = SET5 / "LR_bicubic_X4" / f"{high_path.stem}x4.png"
        low = run.corpus.read(low_path)
        lr = centre_crop(low.pixels, run.plan.sr_lr_crop)
        high = centre_crop(run.corpus.read(high_path).pixels, *_times(lr.shape, SCALE))
        how = {"low_res": "the set's LR_bicubic_X4 file", "lr_crop": _crop_note(low, lr)}
        cases.append(SrCase("Set5", high_path.stem, low.replace(pixels=lr), high, how))
    return cases


def set14_cases(run: Run) -> list[SrCase]:
    """Set14 ships no low-res files: HR cropped to a multiple of 4, then cv2 bicubic 1/4."""
    cases = []
    for high_path in sorted((SET14 / "HR").glob("*.png"))[: run.plan.sr_images]:
        source = run.corpus.read(high_path)
        crop = run.plan.sr_lr_crop
        h, w = source.height // SCALE * SCALE, source.width // SCALE * SCALE
        if crop is not None:
            h, w = min(h, crop * SCALE), min(w, crop * SCALE)
        high = centre_crop(source.pixels, h, w)
        eight_bit = np.rint(high * 255).astype(np.uint8)  # stored as 8 bits, like Set5's LR files
        low = cv2.resize(eight_bit, (w // SCALE, h // SCALE), interpolation=cv2.INTER_CUBIC)
        low = low.reshape(h // SCALE, w // SCALE, -1).astype(np.float32) / 255
        how = {
            "low_res": "HR cropped to a multiple of 4, cv2.resize INTER_CUBIC to 1/4, 8-bit",
            "hr_crop": _crop_note(source, high),
        }
        cases.append(SrCase("Set14", high_path.stem, source.replace(pixels=low), high, how))
    return cases


def _times(shape: tuple[int, ...], factor: int) -> tuple[int, int]:
    return shape[0] * factor, shape[1] * factor


def _crop_note(source: Image, pixels: np.ndarray) -> str | None:
    if pixels.shape[:2] == source.pixels.shape[:2]:
        return None
    return f"centre {pixels.shape[1]}x{pixels.shape[0]} of {source.width}x{source.height}"


def city100_ratio(low: np.ndarray, high: np.ndarray) -> float:
    """The factor by which H must be shrunk (area) and enlarged back (bicubic) to best match L:
    how much less detail the short-focal-length frame holds, in pixels of the shared grid."""
    h, w = high.shape[:2]
    y_low = _shaved(luma(low))
    best, best_db = float(CITY100_RATIOS[0]), -1.0
    for ratio in CITY100_RATIOS:
        small = resize(high, (round(w / ratio), round(h / ratio)), cv2.INTER_AREA)
        blurred = _shaved(luma(resize(small, (w, h), cv2.INTER_CUBIC)))
        db = _db(float(np.mean((blurred - y_low) ** 2))) or float("inf")
        if db > best_db:
            best, best_db = float(ratio), db
    return best


def city100_cases(run: Run) -> tuple[list[SrCase], dict[str, Any]]:
    """Real pairs: the L frame, shrunk by the measured detail ratio, is the model input."""
    pairs = []
    for high_path in sorted(CITY100.glob("*H.PNG"))[: run.plan.city_pairs]:
        low_path = high_path.with_name(high_path.name.replace("H.PNG", "L.PNG"))
        pairs.append((high_path.name[:3], run.corpus.read(low_path), run.corpus.read(high_path)))
    ratios = {name: city100_ratio(low.pixels, high.pixels) for name, low, high in pairs}
    ratio = float(np.median(list(ratios.values())))
    crop = run.plan.city_crop
    cases = []
    for name, low, high in pairs:
        if low.pixels.shape != high.pixels.shape:
            raise SystemExit(
                f"City100 {name}: L and H differ in size; this harness expects them"
                " registered to one pixel grid"
            )
        side = round(crop / ratio)
        lr = resize(centre_crop(low.pixels, crop), (side, side), cv2.INTER_AREA)
        how = {"hr_crop": _crop_note(high, centre_crop(high.pixels, crop))}
        case = SrCase("City100", name, low.replace(pixels=lr), centre_crop(high.pixels, crop), how)
        cases.append(case)
    note = {
        "pixel_ratio": 1.0,
        "detail_ratio_per_pair": ratios,
        "detail_ratio": ratio,
        "protocol": (
            f"L and H are registered to one {pairs[0][2].width}x{pairs[0][2].height} grid (pixel "
            "ratio 1). The detail ratio is the factor by which H, shrunk with INTER_AREA and "
            "enlarged back with INTER_CUBIC, best matches L (PSNR-Y, searched 2.0-4.5 in steps "
            f"of 0.1; median over pairs). A centre {crop}x{crop} crop of L is shrunk with "
            f"INTER_AREA by that ratio to {round(crop / ratio)} px: the model input. Bicubic and "
            f"Lanczos enlarge it to {crop} px; a 4x model's output is resized to {crop} px with "
            "INTER_AREA (or Lanczos when enlarging) before comparing with the H crop."
        ),
    }
    return cases, note


Method = Callable[[Image, tuple[int, int]], np.ndarray]


def interpolation(flag: int) -> Method:
    def enlarge(low: Image, size: tuple[int, int]) -> np.ndarray:
        return resize(low.pixels, size, flag)

    return enlarge


def model_method(run: Run, method: str, weights: Path) -> Method:
    """A 4x model through UpscaleStage at its native scale, its output resized to the truth's
    size where the case's ratio is not 4 (City100)."""
    stage = UpscaleStage(UpscaleOptions(model=str(weights), scale=SCALE, tile=256))

    def enlarge(low: Image, size: tuple[int, int]) -> np.ndarray:
        result = stage.run(low, run.ctx)
        run.note_model(method, result)
        out = result.image.pixels
        if (out.shape[1], out.shape[0]) != size:
            shrinking = size[0] < out.shape[1]
            out = resize(out, size, cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4)
        return out

    return enlarge


def warm_up(methods: dict[str, Method], case: SrCase) -> None:
    """Load every model before timing: an image's seconds then exclude reading the weights."""
    tiny = case.low.replace(pixels=np.ascontiguousarray(case.low.pixels[:16, :16]))
    for method in methods.values():
        method(tiny, (64, 64))


def upscale_methods(run: Run) -> dict[str, Method]:
    methods = {
        "bicubic": interpolation(cv2.INTER_CUBIC),
        "lanczos": interpolation(cv2.INTER_LANCZOS4),
    }
    for name, weights in UPSCALE_MODELS.items():
        methods[name] = model_method(run, name, weights)
    return methods


def bench_upscale(run: Run) -> dict[str, Any]:
    methods = upscale_methods(run)
    city, city_note = city100_cases(run)
    sets = {"Set5": set5_cases(run), "Set14": set14_cases(run), "City100": city}
    warm_up(methods, next(cases[0] for cases in sets.values() if cases))
    section: dict[str, Any] = {
        "scale": SCALE,
        "metrics": (
            f"PSNR and SSIM on the BT.601 Y channel (rgb2ycbcr, 8-bit) with {SHAVE} px shaved; "
            "SSIM: 11x11 Gaussian window, sigma 1.5. sharpness: mean Sobel gradient magnitude "
            "of the output's Y over the high-res image's (1 = as much edge energy as the truth)"
        ),
        "methods": {
            "bicubic": "cv2.resize INTER_CUBIC",
            "lanczos": "cv2.resize INTER_LANCZOS4",
            **{
                name: f"UpscaleStage, {path.name}, fp32, tile 256"
                for name, path in UPSCALE_MODELS.items()
            },
        },
        "sets": {},
    }
    for name, cases in sets.items():
        shown = _sheet_case(name, cases)
        rows = [_upscale_case(run, case, methods, case is shown) for case in cases]
        section["sets"][name] = {
            "images": rows,
            "mean": summarise(
                [row["methods"] | {"image": row["image"]} for row in rows],
                "image",
                ("psnr_y", "ssim_y", "sharpness", "seconds"),
            ),
        }
    section["sets"]["City100"]["pairs"] = city_note
    return section


def _sheet_case(set_name: str, cases: list[SrCase]) -> SrCase | None:
    """The case of this set shown on the sheet: the one named in SHEET_UPSCALE, else (a quick
    run) the set's first; Set5 is not shown."""
    if set_name not in {name.split("/")[0] for name in SHEET_UPSCALE} or not cases:
        return None
    named = [case for case in cases if f"{case.set}/{case.name}" in SHEET_UPSCALE]
    return named[0] if named else cases[0]


def _upscale_case(
    run: Run, case: SrCase, methods: dict[str, Method], on_sheet: bool
) -> dict[str, Any]:
    size = (case.high.shape[1], case.high.shape[0])
    outputs, scores = {}, {}
    for name, method in methods.items():
        started = time.perf_counter()
        outputs[name] = method(case.low, size)
        scores[name] = {
            **sr_scores(outputs[name], case.high),
            "seconds": time.perf_counter() - started,
        }
    label = f"{case.set}/{case.name}"
    if on_sheet:
        run.sheet.append(_upscale_sheet_row(case, outputs, scores))
    print(f"  upscale {label}", file=sys.stderr)
    return {
        "image": case.name,
        "lr_size": [case.low.width, case.low.height],
        "hr_size": list(size),
        **case.how,
        "methods": scores,
    }


def _upscale_sheet_row(case: SrCase, outputs: dict[str, np.ndarray], scores: dict) -> SheetRow:
    corner = busiest_window(gradient(case.high), SHEET_CELL)
    cells = [
        (f"{name} {_fmt(scores[name]['psnr_y'], 1)} dB", crop_at(outputs[name], corner))
        for name in ("bicubic", *UPSCALE_MODELS)
    ]
    cells.append(("high-res truth", crop_at(case.high, corner)))
    caption = f"upscale: {case.set}/{case.name}, {case.low.width}x{case.low.height} in (PSNR-Y)"
    return SheetRow(caption, cells)


def print_upscale(section: dict[str, Any]) -> None:
    for name, data in section["sets"].items():
        if not data["images"]:
            continue
        print(
            f"\nupscale x{SCALE}, {name}, {len(data['images'])} images (mean; Y channel, "
            f"{SHAVE} px shaved; sharpness = mean gradient over the truth's):"
        )
        print(f"{'method':<16}{'PSNR-Y dB':>10}{'SSIM-Y':>9}{'sharpness':>11}{'s/image':>9}")
        for method, scores in data["mean"].items():
            print(
                f"{method:<16}{scores['psnr_y']:>10.2f}{scores['ssim_y']:>9.4f}"
                f"{scores['sharpness']:>11.2f}{scores['seconds']:>9.2f}"
            )
    pairs = section["sets"]["City100"].get("pairs")
    if pairs:
        print(f"City100: detail ratio L:H measured {pairs['detail_ratio']} (pixel ratio 1)")


# --- main ------------------------------------------------------------------------------------


def git_state() -> dict[str, Any]:
    """The commit this ran from, and whether this script differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "script_modified": bool(git("status", "--porcelain", "--", "bench/quality.py")),
    }


def command(argv: list[str] | None) -> str:
    """The command line, paths relative to the repository where they lie inside it."""
    python = Path(sys.executable)
    if python.is_relative_to(REPO):
        python = python.relative_to(REPO)
    args = sys.argv[1:] if argv is None else argv
    return shlex.join([str(python), str(Path(__file__).relative_to(REPO)), *args])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, of {', '.join(SECTIONS)} (default: all), or named only: "
        f"{', '.join(EXTRA_SECTIONS)}",
    )
    parser.add_argument("--quick", action="store_true", help="one small crop per data set")
    parser.add_argument("--pairs", type=int, help="only the first N PolyU pairs")
    results = REPO / "bench" / "results"
    parser.add_argument("--out", type=Path, default=results / "quality.json")
    parser.add_argument("--sheet", type=Path, default=results / "quality_sheet.png")
    parser.add_argument(
        "--detector-model", help="restore sections: the learned detector's weights (id or path)"
    )
    parser.add_argument("--threshold", type=float, help="restore sections: the detector's cut")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS) - set(EXTRA_SECTIONS))
    if unknown or not args.sections:
        choices = ", ".join((*SECTIONS, *EXTRA_SECTIONS))
        parser.error(f"--sections: unknown {unknown}; choose from {choices}")
    return args


RUNNERS: dict[str, tuple[Callable[[Run], dict], Callable[[dict], None]]] = {
    "denoise": (bench_denoise, print_denoise),
    "restore": (bench_restore, print_restore),
    "restore-classic": (lambda run: bench_restore(run, "classic"), print_restore),
    "restore-learned": (lambda run: bench_restore(run, "learned"), print_restore),
    "upscale": (bench_upscale, print_upscale),
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: no corpus or weights to measure with", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    if args.pairs is not None:
        plan = Plan(**{**plan.__dict__, "denoise_pairs": args.pairs})
    report: dict[str, Any] = {
        "command": command(argv),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **git_state(),
        "plan": plan.__dict__,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        ctx = StageContext(models=ModelStore(Path(cache)), device="cpu", precision="fp32")
        run = Run(ctx, plan)
        if args.detector_model is not None:
            run.restore["detector_model"] = args.detector_model
        if args.threshold is not None:
            run.restore["threshold"] = args.threshold
        for name in [s for s in (*SECTIONS, *EXTRA_SECTIONS) if s in args.sections]:
            report[name] = RUNNERS[name][0](run)
    report["seconds"] = time.perf_counter() - started
    report["corpus"] = dict(sorted(run.corpus.files.items()))
    report["models"] = run.models
    if run.sheet:
        report["sheet"] = render_sheet(run.sheet, args.sheet)
    for name in [s for s in (*SECTIONS, *EXTRA_SECTIONS) if s in report]:
        RUNNERS[name][1](report[name])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}" + (f" and {args.sheet}" if run.sheet else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
