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
    "graphics",
    "training_images",
]

_SUB = 16  # cv2 drawing's sub-pixel factor (shift=4)
# A pixel is damage (target 1) where the defects moved it by more than this (0..1 units):
# visible damage, including the soft skirt of a blurred speck.
# bench/quality.py's VISIBLE: the harness counts a pixel as damaged from 2/255 on, so the soft
# skirt of a blurred speck or scratch is damage to find too.
COVER = 2 / 255
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
    pixels: np.ndarray  # (H, W, 3) RGB in 0..1 after damage and degradations
    coverage: np.ndarray  # (H, W) float32: how far the defects moved each pixel (0..1)

    @property
    def mask(self) -> np.ndarray:
        """(H, W) float32: 1 on damaged pixels (moved by COVER or more)."""
        return (self.coverage >= COVER).astype(np.float32)


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
    # Radius up to 6.5 px, lobes included within about 2r: dust, not a feature of the picture.
    # Recipe v2 drew blobs up to 9 px with lobes strewn 0.7r apart (25 px across): the network
    # learnt that any smooth bright or dark patch 20 px wide may be dust (a butterfly's wing
    # cells, a pepper's highlights).
    r = rng.uniform(0.6, 4.0) if rng.random() < 0.7 else rng.uniform(4.0, 6.5)
    axes = (int(r * _SUB), int(r * rng.uniform(0.4, 1.0) * _SUB))
    cv2.ellipse(layer, centre, axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, 4)
    if r > 2.5 and rng.random() < 0.5:  # irregular blob: a few overlapping lobes
        for _ in range(int(rng.integers(1, 4))):
            dx, dy = np.clip(rng.normal(0, r * 0.5, 2), -r, r) * _SUB
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


_FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_COMPLEX_SMALL,
    cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
)  # fmt: skip
_GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.,:;-+=/()%!?"


def _ink(rng: np.random.Generator, paper: np.ndarray) -> tuple[float, float, float]:
    """A colour that stands out from `paper`: mostly near-black or near-white, sometimes any."""
    if rng.random() < 0.3:
        colour = rng.uniform(0, 1, 3)
    else:
        colour = np.full(3, 0.05 if paper.mean() > 0.5 else 0.95) + rng.normal(0, 0.05, 3)
    return tuple(float(v) for v in np.clip(colour, 0, 1))


def _paint(canvas: np.ndarray, colour: tuple[float, float, float], draw) -> None:
    """Composite in `colour` what `draw` draws (in 255, anti-aliased) on a uint8 layer: OpenCV
    draws text on 8-bit images only."""
    layer = np.zeros(canvas.shape[:2], np.uint8)
    draw(layer)
    a = (layer.astype(np.float32) / 255)[:, :, None]
    canvas *= 1 - a
    canvas += a * np.asarray(colour, np.float32)


def graphics(size: int, rng: np.random.Generator, photo: np.ndarray | None = None) -> np.ndarray:
    """A clean (size, size, 3) float32 picture of what a scanner also meets and the detector
    must leave alone: text, bullets, rules, tables, outlines, hatching and flat cartoon shapes
    with dark contours (slides, documents, comics, captions), on flat paper, a gradient or a
    photograph (`photo`, already cropped to size). Anti-aliased like a rendered or scanned page."""
    if photo is not None and rng.random() < 0.3:
        canvas = np.repeat(photo, 3 // photo.shape[2], axis=2).astype(np.float32)
    else:
        paper = rng.uniform(0.75, 1.0, 3) if rng.random() < 0.75 else rng.uniform(0, 1, 3)
        canvas = np.empty((size, size, 3), np.float32)
        canvas[:] = paper
        if rng.random() < 0.3:  # a gradient fill, as slides have
            ramp = np.linspace(0, rng.uniform(-0.3, 0.3), size, dtype=np.float32)
            canvas += ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    canvas = np.ascontiguousarray(np.clip(canvas, 0, 1))
    paper = canvas.mean(axis=(0, 1))
    aa = cv2.LINE_AA
    for _ in range(int(rng.integers(0, 4))):  # flat shapes with contours (comic, chart)
        pts = rng.uniform(0, size, 2) + rng.normal(0, size / 4, (int(rng.integers(3, 8)), 2))
        pts = np.round(pts * _SUB).astype(np.int32).reshape(-1, 1, 2)
        fill = tuple(float(v) for v in rng.uniform(0, 1, 3))
        _paint(canvas, fill, lambda layer, pts=pts: cv2.fillPoly(layer, [pts], 255, aa, 4))
        if rng.random() < 0.8:
            thick = int(rng.choice([1, 1, 2, 3]))
            outline = lambda layer, pts=pts, t=thick: cv2.polylines(  # noqa: E731
                layer, [pts], True, 255, t, aa, 4
            )
            _paint(canvas, _ink(rng, paper), outline)
    for _ in range(int(rng.integers(0, 4))):  # rules, boxes, table grids, arrows, circles
        kind = rng.choice(["line", "box", "grid", "arrow", "circle", "hatch"])
        thick = int(rng.choice([1, 1, 1, 2, 3]))
        a, b = (tuple(int(v) for v in rng.uniform(0, size, 2)) for _ in range(2))
        if kind == "line" and rng.random() < 0.6:  # axis-aligned, as most rules are
            b = (b[0], a[1]) if rng.random() < 0.5 else (a[0], b[1])
        radius, step = int(rng.uniform(3, size / 3)), int(rng.integers(4, 24))

        def shape(layer, kind=kind, a=a, b=b, t=thick, radius=radius, step=step):
            if kind == "line":
                cv2.line(layer, a, b, 255, t, aa)
            elif kind == "box":
                cv2.rectangle(layer, a, b, 255, t, aa)
            elif kind == "arrow":
                cv2.arrowedLine(layer, a, b, 255, t, aa, tipLength=0.1)
            elif kind == "circle":
                cv2.circle(layer, a, radius, 255, t, aa)
            else:
                for u in range(-size, size, step):
                    if kind == "grid":
                        cv2.line(layer, (u, 0), (u, size), 255, t, aa)
                        cv2.line(layer, (0, u), (size, u), 255, t, aa)
                    else:
                        cv2.line(layer, (u, 0), (u + size, size), 255, 1, aa)

        _paint(canvas, _ink(rng, paper), shape)
    scale = rng.uniform(0.3, 1.6)
    font = int(_FONTS[int(rng.integers(len(_FONTS)))])
    thick = int(rng.choice([1, 1, 1, 2, 3]))
    gap = max(8, int(30 * scale * rng.uniform(1.0, 1.6)))
    bullets = rng.random() < 0.4
    lines = []
    for row in range(int(rng.uniform(0, 1.2) * size / gap) + 1):  # lines of text
        y, x = int(gap * (row + 0.8) + rng.uniform(-2, 2)), int(rng.uniform(0, 0.4) * size)
        text = "".join(_GLYPHS[int(i)] for i in rng.integers(0, len(_GLYPHS), 40))
        lines.append(
            (x, y, " ".join(text[i : i + int(rng.integers(2, 9))] for i in range(0, 40, 8)))
        )

    def write(layer):
        for x, y, text in lines:
            if bullets:
                dot = (x - int(12 * scale) - 2, y - int(8 * scale))
                cv2.circle(layer, dot, max(1, int(4 * scale)), 255, -1, aa)
            cv2.putText(layer, text, (x, y), font, scale, 255, thick, aa)

    _paint(canvas, _ink(rng, paper), write)
    return np.clip(canvas, 0, 1)


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
            # Near neutral (dust, paper showing through), but a share of fibres and of
            # scratches into a colour print's dye layers carries its own colour.
            spread = 0.2 if kind in ("hair", "scratch") and rng.random() < 0.2 else 0.03
            tint = np.clip(value + rng.normal(0, spread, out.shape[2]), 0, 1).astype(np.float32)
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


def _halftone(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A printed halftone screen (one screen for every channel, the look of a newspaper or
    book reproduction scanned again)."""
    period = rng.uniform(3, 6)
    yy, xx = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]].astype(np.float32)
    angle = math.radians(45)
    u = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) * 2 * math.pi / period
    screen = ((np.cos(u) * np.cos(v) + 1) / 2)[:, :, None]
    dots = (rgb > screen).astype(np.float32)
    return cv2.GaussianBlur(dots, (0, 0), period / 3) * 0.6 + rgb * 0.4


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG round trip (colour with 4:2:0 chroma subsampling, OpenCV's default)."""
    bgr = np.rint(np.clip(rgb[:, :, ::-1], 0, 1) * 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32) / 255


def _grain(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Unit film grain over (H, W, 3): mostly shared by the three dye layers (so mostly
    luminance), partly their own; clumped (blurred) half the time."""
    shared = rng.normal(0, 1, (*shape[:2], 1)).astype(np.float32)
    own = rng.normal(0, 1, (*shape[:2], 3)).astype(np.float32)
    grain = 0.85 * shared + 0.5 * own
    if rng.random() < 0.5:
        grain = cv2.GaussianBlur(grain, (0, 0), 0.7) * 1.8
    return grain


def damage(clean: np.ndarray, rng: np.random.Generator, *, amount: float = 1.0) -> Damaged:
    """A damaged, degraded RGB crop of `clean` (H, W, C float32 in 0..1) and how far the
    defects moved each pixel. Degradations come after the damage, as on a real scan of a
    damaged print; a grey original (or a crop toned grey) stays grey, chroma zero."""
    rgb = clean if clean.shape[2] == 3 else np.repeat(clean, 3, 2)
    rgb = _tone(rgb.astype(np.float32), rng)
    x, coverage = draw_defects(rgb, rng, amount=amount)
    x = x.astype(np.float32)
    grey = bool(np.all(rgb[:, :, :1] == rgb))
    if rng.random() < 0.3:  # optical blur of the scanner or enlarger
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.0))
    if rng.random() < 0.08:
        x = _halftone(x, rng)
    if rng.random() < 0.6:  # film grain: luminance-dependent, slightly clumped
        grain = _grain(x.shape, rng)
        x = x + grain * rng.uniform(0.005, 0.05) * np.sqrt(np.clip(x, 0.02, 1))
    if rng.random() < 0.4:  # scanner noise: white noise and faint row streaks
        x = x + rng.normal(0, rng.uniform(0.002, 0.02), x.shape).astype(np.float32)
        x = x + rng.normal(0, 0.004, (x.shape[0], 1, 1)).astype(np.float32)
    if rng.random() < 0.35:
        x = _jpeg(x, int(rng.integers(40, 96)))
    if grey:  # a grey scan stays grey whatever its grain and noise
        x = np.repeat(_luma(x)[:, :, None], 3, 2)
    return Damaged(np.clip(x, 0, 1).astype(np.float32), coverage.astype(np.float32))
