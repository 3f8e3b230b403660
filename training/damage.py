"""Procedural print and film damage for training the defect detector: dust, scratches, hairs
and cracks drawn on a clean photograph, then the scan's own degradations (tone, grain, blur,
halftone, JPEG, scanner noise, scale) applied over them; the defects' footprint is the target.

Only clean images the project may train on are used (see `training_images`): scikit-image's
bundled CC0 / public-domain photographs, the corpus's McMaster images and City100's H frames
(MIT). Set5/Set14 (which the harness evaluates on), Real-ESRGAN's test crops (cut from Set14's
baboon and comic) and any held-out material are refused by name."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "COVER",
    "Damaged",
    "damage",
    "draw_defects",
    "training_images",
]

_SUB = 16  # cv2 drawing's sub-pixel factor (shift=4)
# A pixel is damage (target 1) where the defects moved it by more than this (0..1 units):
# visible damage, including the soft skirt of a blurred speck.
COVER = 0.02
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_FORBIDDEN = ("set5", "set14", "holdout", "realesrgan")
# scikit-image's bundled photographs (CC0 or public domain, see its data/README.txt) that are
# real photographs rather than drawings, masks or stereo maps.
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png",
    "retina.jpg", "rocket.jpg", "page.png", "text.png",
)  # fmt: skip


@dataclass(frozen=True)
class Damaged:
    pixels: np.ndarray  # (H, W, 1) luma in 0..1 after damage and degradations
    mask: np.ndarray  # (H, W) float32: 1 on damaged pixels


def training_images(corpus: Path | None) -> list[Path]:
    """The clean images the detector may learn from, in a fixed order."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    paths = [data / name for name in SKIMAGE_PHOTOS if (data / name).exists()]
    if corpus is not None:
        mcmaster = corpus / "sr_benchmark" / "McMaster" / "HR"
        paths += sorted(p for p in mcmaster.glob("*.tif"))
        # City100's high-detail frames: streets, buildings, wires and signs, the thin natural
        # lines and fine texture a detector must learn to leave alone.
        city = corpus / "real_lr_hr_pairs" / "City100_NikonD5500"
        paths += sorted(city.glob("*H.PNG"))
    for path in paths:
        if any(part in str(path).lower() for part in _FORBIDDEN):
            raise ValueError(f"{path}: not allowed as training data")
    return paths


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ _LUMA if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb.reshape(rgb.shape[:2])


def _polyline(layer: np.ndarray, points: np.ndarray, width: int) -> None:
    pts = np.round(points * _SUB).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(layer, [pts], False, 255, max(1, width), cv2.LINE_AA, 4)


def _curve(rng: np.random.Generator, size: tuple[int, int], length: float, bend: float):
    """Points of a smooth curve `length` long starting somewhere in the image."""
    h, w = size
    start = np.array([rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h])
    angle = rng.uniform(0, 2 * math.pi)
    steps = max(2, int(length / 4))
    turn = rng.normal(0, bend, steps).cumsum() * 0.15
    angles = angle + turn
    deltas = np.stack([np.cos(angles), np.sin(angles)], 1) * (length / steps)
    return np.vstack([start, start + deltas.cumsum(0)])


def _scratch(layer: np.ndarray, rng: np.random.Generator) -> None:
    h, w = layer.shape
    length = rng.uniform(0.3, 1.5) * max(h, w)
    points = _curve(rng, (h, w), length, rng.choice([0.0, 0.05, 0.3]))
    width = int(rng.choice([1, 1, 1, 2, 2, 3, 4, 6, 8]))
    _polyline(layer, points, width)


def _speck(layer: np.ndarray, rng: np.random.Generator) -> None:
    h, w = layer.shape
    centre = (int(rng.uniform(0, w) * _SUB), int(rng.uniform(0, h) * _SUB))
    r = rng.uniform(0.6, 5.0) if rng.random() < 0.85 else rng.uniform(5, 9)
    axes = (int(r * _SUB), int(r * rng.uniform(0.4, 1.0) * _SUB))
    cv2.ellipse(layer, centre, axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, 4)
    if r > 2.5 and rng.random() < 0.5:  # irregular blob: a few overlapping lobes
        for _ in range(int(rng.integers(1, 4))):
            dx, dy = rng.normal(0, r * 0.7 * _SUB, 2)
            lobe = (int(centre[0] + dx), int(centre[1] + dy))
            size = (int(r * rng.uniform(0.3, 0.7) * _SUB),) * 2
            cv2.ellipse(layer, lobe, size, 0, 0, 360, 255, -1, cv2.LINE_AA, 4)


def _hair(layer: np.ndarray, rng: np.random.Generator) -> None:
    h, w = layer.shape
    points = _curve(rng, (h, w), rng.uniform(15, 0.8 * max(h, w)), rng.uniform(0.6, 1.5))
    _polyline(layer, points, int(rng.choice([1, 1, 2])))


def _crack(layer: np.ndarray, rng: np.random.Generator) -> None:
    """A branching network of jagged thin lines."""
    h, w = layer.shape
    tips = [np.array([rng.uniform(0, w), rng.uniform(0, h)])]
    for _ in range(int(rng.integers(3, 10))):
        start = tips[int(rng.integers(len(tips)))]
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(8, 0.4 * max(h, w))
        steps = max(2, int(length / 3))
        angles = angle + rng.normal(0, 0.5, steps)
        pts = np.vstack(
            [start, start + (np.stack([np.cos(angles), np.sin(angles)], 1) * 3).cumsum(0)]
        )
        _polyline(layer, pts, int(rng.choice([1, 1, 2])))
        tips.append(pts[-1])
        tips.append(pts[len(pts) // 2])


_DRAW = {"scratch": _scratch, "speck": _speck, "hair": _hair, "crack": _crack}


def draw_defects(
    rgb: np.ndarray, rng: np.random.Generator, *, amount: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Composite defects onto `rgb` (H, W, C float32). Each is bright (dust, a scratch through
    the emulsion of a print) or dark (dust on a negative, hairs, cracks), partly transparent,
    with a hard or soft edge. Returns the damaged pixels and how far the defects moved each
    pixel (the largest change over channels)."""
    h, w = rgb.shape[:2]
    out = rgb.astype(np.float32).copy()
    area = h * w / (256 * 256)
    counts = {
        "scratch": rng.poisson(1.2 * amount * math.sqrt(area)),
        "speck": rng.poisson(8 * amount * area),
        "hair": rng.poisson(0.7 * amount * math.sqrt(area)),
        "crack": rng.poisson(0.15 * amount * math.sqrt(area)),
    }
    for kind, count in counts.items():
        for _ in range(int(count)):
            layer = np.zeros((h, w), np.uint8)
            _DRAW[kind](layer, rng)
            alpha = layer.astype(np.float32) / 255
            if rng.random() < 0.45:  # soft edge
                alpha = cv2.GaussianBlur(alpha, (0, 0), rng.uniform(0.4, 1.5))
            opacity = rng.uniform(0.55, 1.0)
            bright = rng.random() < (0.6 if kind in ("scratch", "speck") else 0.25)
            value = rng.uniform(0.85, 1.0) if bright else rng.uniform(0.0, 0.15)
            tint = np.clip(value + rng.normal(0, 0.03, out.shape[2]), 0, 1).astype(np.float32)
            a = (alpha * opacity)[:, :, None]
            out = out * (1 - a) + tint * a
    coverage = np.abs(out - rgb).max(axis=2)
    return out, coverage


def _tone(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y = _luma(rgb)[:, :, None]
    kind = rng.choice(["none", "grey", "sepia", "fade", "cyan"], p=[0.4, 0.25, 0.15, 0.15, 0.05])
    if kind == "grey":
        return np.repeat(y, 3, 2)
    if kind == "sepia":
        return np.clip(y * np.array([1.07, 0.95, 0.78], np.float32) + 0.03, 0, 1)
    if kind == "cyan":
        return np.clip(y * np.array([0.6, 0.85, 1.0], np.float32) + 0.05, 0, 1)
    if kind == "fade":
        lift, keep = rng.uniform(0.05, 0.3), rng.uniform(0.55, 0.9)
        return lift + keep * rgb
    return rgb


def _halftone(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    period = rng.uniform(3, 6)
    yy, xx = np.mgrid[0 : y.shape[0], 0 : y.shape[1]].astype(np.float32)
    angle = math.radians(45)
    u = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) * 2 * math.pi / period
    screen = (np.cos(u) * np.cos(v) + 1) / 2
    dots = (y > screen).astype(np.float32)
    return cv2.GaussianBlur(dots, (0, 0), period / 3) * 0.6 + y * 0.4


def _jpeg(y: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", np.rint(np.clip(y, 0, 1) * 255).astype(np.uint8),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])  # fmt: skip
    assert ok
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255


def damage(clean: np.ndarray, rng: np.random.Generator, *, amount: float = 1.0) -> Damaged:
    """A damaged, degraded luma crop of `clean` (H, W, C float32 in 0..1) and its target mask.
    Degradations come after the damage, as on a real scan of a damaged print."""
    rgb = clean if clean.shape[2] == 3 else np.repeat(clean, 3, 2)
    rgb = _tone(rgb.astype(np.float32), rng)
    damaged, coverage = draw_defects(rgb, rng, amount=amount)
    y = _luma(damaged).astype(np.float32)
    if rng.random() < 0.3:  # optical blur of the scanner or enlarger
        y = cv2.GaussianBlur(y, (0, 0), rng.uniform(0.3, 1.0))
    if rng.random() < 0.08:
        y = _halftone(y, rng)
    if rng.random() < 0.6:  # film grain: luminance-dependent, slightly clumped
        grain = rng.normal(0, 1, y.shape).astype(np.float32)
        if rng.random() < 0.5:
            grain = cv2.GaussianBlur(grain, (0, 0), 0.7) * 1.8
        y = y + grain * rng.uniform(0.005, 0.05) * np.sqrt(np.clip(y, 0.02, 1))
    if rng.random() < 0.4:  # scanner noise: white noise and faint row streaks
        y = y + rng.normal(0, rng.uniform(0.002, 0.02), y.shape).astype(np.float32)
        y = y + rng.normal(0, 0.004, (y.shape[0], 1)).astype(np.float32)
    if rng.random() < 0.35:
        y = _jpeg(y, int(rng.integers(40, 96)))
    mask = (coverage >= COVER).astype(np.float32)
    return Damaged(np.clip(y, 0, 1)[:, :, None].astype(np.float32), mask)
