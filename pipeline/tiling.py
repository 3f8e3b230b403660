"""Tiled inference: run an image model tile by tile with feathered overlaps, so memory is
bounded by the tile and a row of tiles, never by the whole image."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from spandrel.__helpers.size_req import pad_tensor

from pipeline import buffers
from pipeline.errors import StageError

__all__ = [
    "Engine",
    "TileSettings",
    "TiledResult",
    "auto_overlap",
    "luma",
    "overlap_for",
    "resolve_device",
    "resolve_precision",
    "run_tiled",
    "tile_span",
    "tile_starts",
    "vulkan_device",
]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIN_TILE = 32
_MIN_WEIGHT = 1e-4  # keeps every covered pixel's total weight positive
_AUTO_OVERLAP = {"ESRGAN": 80, "Compact": 24}
# Where the engine itself runs below fp32 (bf16, fp16), its error and the seams' share the one
# 50 dB budget, so the seams must agree better.
_AUTO_OVERLAP_REDUCED = {"ESRGAN": 96}
# ITU-R BT.601 luma, the weights OpenCV's RGB2GRAY uses: a grey scan run through an RGB model
# (as three equal channels) comes back as the grey it would have been.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_LUMA_BAND_ROWS = 256


@dataclass(frozen=True)
class TileSettings:
    """How to cut the image: tiles advance by about `tile` input pixels (0 = whole image) and each
    reads `overlap` more, shared with its neighbour (upstream's tile + tile_pad, on one side);
    `batch` tiles go to the model per call."""

    tile: int = 256
    overlap: int = 16
    batch: int = 1
    max_bytes_in_ram: int = 256 << 20  # larger outputs go to a disk-backed buffer
    scratch_dir: Path | None = None


@dataclass(frozen=True)
class TiledResult:
    pixels: np.ndarray
    tile: int  # the tile size actually used (smaller than asked after a CUDA out-of-memory)
    tiles: int


def resolve_device(device: str) -> str:
    """Map "auto" to cuda, then mps, then cpu; reject a device this machine does not have.
    "vulkan[:N]" (ncnn on a Vulkan GPU: AMD, Intel, or Mesa's software driver) resolves to "cpu"
    for torch, which runs what ncnn cannot (face detection, unconvertible models)."""
    if device.split(":", 1)[0] == "vulkan":
        vulkan_device(device)  # raises when there is no such GPU
        return "cpu"
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":", 1)[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise StageError(f"device {device!r} requested but CUDA is not available")
    if kind not in ("cpu", "cuda", "mps"):
        raise StageError(f"device {device!r}: must be auto, cpu, cuda[:N], mps or vulkan[:N]")
    return device


def vulkan_device(device: str) -> int | None:
    """The Vulkan GPU index of a "vulkan[:N]" device (None for any other device), checked against
    the GPUs ncnn sees; raises StageError when there is none."""
    kind, _, index = device.partition(":")
    if kind != "vulkan":
        return None
    if index and not index.isdigit():
        raise StageError(f"device {device!r}: must be vulkan or vulkan:N")
    number = int(index or 0)
    try:
        import ncnn

        count = int(ncnn.get_gpu_count())
    except (ImportError, AttributeError) as exc:
        raise StageError(f"device {device!r}: ncnn with Vulkan is not available ({exc})") from exc
    if number >= count:
        raise StageError(
            f"device {device!r} requested but ncnn sees {count} Vulkan GPU(s) "
            "(install the GPU's Vulkan driver, or Mesa's mesa-vulkan-drivers)"
        )
    return number


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX-512 BF16 or AMX); on plain AVX2 CPUs bf16
    convolutions fall back to emulation and run about ten times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str, descriptor: Any) -> str:
    """Pick the fastest precision that keeps output equal to fp32 within our tolerance.

    CUDA: fp16 where the architecture supports it. CPU: always fp32. bf16 keeps 8 bits of
    mantissa, so even with native kernels (AVX-512 BF16, AMX) a 16-bit scan came back with
    errors of 2^-9 (1/8 of a 12-bit step), and on AVX2-only CPUs it is emulated, ~10x slower
    (bench/upscale.py); it stays available, asked for by name.
    """
    if precision not in PRECISIONS:
        raise StageError(f"precision {precision!r}: must be one of {', '.join(PRECISIONS)}")
    kind = device.split(":", 1)[0]
    if precision == "auto":
        if kind == "cuda":
            return "fp16" if descriptor.supports_half else "fp32"
        return "fp32"
    if precision == "fp16" and not descriptor.supports_half:
        raise StageError(f"{descriptor.architecture.id} does not support fp16")
    if precision == "bf16" and not descriptor.supports_bfloat16:
        raise StageError(f"{descriptor.architecture.id} does not support bf16")
    if precision == "fp16" and kind == "cpu":
        raise StageError("fp16 is not supported on the CPU; use fp32 or bf16")
    return precision


class Engine:
    """A spandrel image model placed on a device at a precision, called on NCHW batches.

    The descriptor must already be on `device`, in fp16 for fp16 and fp32 otherwise (models are
    shared between stages, so the engine never casts them). On the CPU the model runs
    channels-last (oneDNN's preferred layout; the layout change does not alter results) and
    bf16 runs under autocast so weights stay fp32.
    `compile` wraps the module with torch.compile (slow first call).
    An fp16 call that comes back with NaN or inf (half overflow: the black outputs upstream
    users meet), or black where its input is not, is run again in fp32; `fp32_fallbacks`
    counts those calls. `fp32_descriptor` is the model's fp32 twin for that (else a copy of the
    half weights is widened, which keeps their fp16 rounding).
    """

    def __init__(
        self,
        descriptor: Any,
        *,
        device: str,
        precision: str,
        compile: bool = False,
        fp32_descriptor: Any = None,
    ):
        self.descriptor = descriptor
        self.device = torch.device(device)
        self.precision = precision
        self.scale = int(descriptor.scale)
        self.in_channels = int(descriptor.input_channels)
        model = descriptor.model
        expected = torch.float16 if precision == "fp16" else torch.float32
        if descriptor.dtype != expected or descriptor.device != self.device:
            raise StageError(
                f"engine: model is {descriptor.dtype} on {descriptor.device}, "
                f"expected {expected} on {self.device} for {precision}"
            )
        # Not for a model with 5-D weights (GFPGAN's modulated convolutions), which torch
        # cannot convert, and whose forward views activations as contiguous.
        self._channels_last = self.device.type == "cpu" and all(
            tensor.dim() != 5 for tensor in (*model.parameters(), *model.buffers())
        )
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._module = torch.compile(model, dynamic=False) if compile else model
        self.compiled = compile
        self.fp32_fallbacks = 0
        self._fp32_module: Any = None if fp32_descriptor is None else fp32_descriptor.model
        # Called the way spandrel calls it: some forwards are not image -> image (FBCNN also
        # returns its quality estimate; FDnCNN/DRUNet take a noise-level map).
        self._call_fn = getattr(descriptor, "_call_fn", None) or (
            lambda module, image: module(image)
        )

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Upscale an NCHW float32 batch in [0, 1]; returns float32 on the CPU, clamped."""
        height, width = batch.shape[-2:]
        _, x = pad_tensor(batch, self.descriptor.size_requirements)
        x = exact = x.to(self.device, non_blocking=True)
        if self.precision == "fp16":
            x = x.half()
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                y = self._call_fn(self._module, x)
        else:
            y = self._call_fn(self._module, x)
        if self.precision == "fp16" and (why := _broken_half(x, y)) is not None:
            log.warning("fp16 output %s on %s: running the tile again in fp32", why, self.device)
            self.fp32_fallbacks += 1
            y = self._call_fn(self._fp32(), exact)
        y = y[..., : height * self.scale, : width * self.scale]
        return y.float().clamp_(0, 1).cpu()

    def _fp32(self) -> Any:
        """An fp32 copy of the model, made the first time an fp16 call fails."""
        if self._fp32_module is None:
            self._fp32_module = copy.deepcopy(self.descriptor.model).float().eval()
        return self._fp32_module


def _broken_half(x: torch.Tensor, y: torch.Tensor) -> str | None:
    """Why an fp16 output cannot be kept, or None."""
    if not bool(torch.isfinite(y).all()):
        return "has NaN or inf"
    if float(y.max()) <= 1 / 255 < float(x.max()) - 16 / 255:
        return "is black where its input is not"
    return None


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of equal tiles of size `tile` covering [0, length), spread evenly so that
    neighbours share at least `overlap` pixels. Equal shapes batch well and compile once."""
    if length <= tile:
        return [0]
    count = _tile_count(length, tile, overlap)
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _tile_count(length: int, tile: int, overlap: int) -> int:
    """The fewest tiles of `tile` pixels sharing at least `overlap` that cover `length`."""
    return math.ceil((length - overlap) / (tile - overlap))


def tile_span(length: int, tile: int, overlap: int) -> int:
    """The side of each tile along a `length`: the fewest tiles of at most `tile` pixels that
    share at least `overlap`, each made just large enough for that.

    A full-size tile would share more than needed wherever `length` is not a whole number of
    steps: 448 px cut into 320 px tiles read 2 x 320 (192 shared) where 2 x 256 (64 shared)
    covers it with the same context at every seam, 1.6x fewer pixels through the model."""
    if length <= tile:
        return length
    count = _tile_count(length, tile, overlap)
    return min(tile, math.ceil((length + overlap * (count - 1)) / count))


def auto_overlap(descriptor: Any, precision: str = "fp32") -> int:
    """Overlap (input pixels) that keeps tiled output at or above 50 dB of whole-image output
    for an engine running at `precision`.

    RRDBNet (Real-ESRGAN x4plus/x2plus) is deep enough that a tile border still disturbs pixels
    tens of pixels away; the compact v3 models settle much sooner. Measured with tiles that
    share exactly the overlap (tile_span), on the real weights, at the worst seam found (Set14
    baboon): x4plus 47.6 dB at 64 px, 53.3 dB at 80 px, 57.8 dB at 96 px; general-x4v3
    51.8 dB at 16 px, 56.5 dB or more at 24 px. The seams and the engine share the budget:
    OpenVINO bf16, about 51 dB from fp32 on its own, came to 49.8 dB end to end with x4plus at
    80 px and 50.5 dB at 96, so a reduced-precision engine gets 96 there. bench/upscale.py
    measures whole images.
    """
    architecture = descriptor.architecture.id
    overlap = _AUTO_OVERLAP.get(architecture, 32)
    if precision != "fp32":
        overlap = _AUTO_OVERLAP_REDUCED.get(architecture, overlap)
    return overlap


def overlap_for(engine: Any, overlap: int | str) -> int:
    """A stage's `overlap` option: a number as it is, "auto" for the engine's model and
    precision (auto_overlap)."""
    return auto_overlap(engine.descriptor, engine.precision) if overlap == "auto" else int(overlap)


def _ramp(length: int) -> np.ndarray:
    """Weights rising across an overlap of `length` pixels: ~0 over the outer 3/8 (tile borders
    are where padding artefacts live), a linear ramp over the middle quarter, then 1.

    Steeper than a full-width ramp: on the real weights it agreed better with whole-image
    output at equal overlap, and the seam it leaves is far below one 8-bit level."""
    u = (np.arange(length, dtype=np.float32) + 0.5) / length
    return np.clip((u - 0.375) / 0.25, _MIN_WEIGHT, 1.0)


def _window(starts: list[int], index: int, size: int, scale: int) -> np.ndarray:
    """1-D blending weights, in output pixels, for tile `index` of a row or column of tiles."""
    weights = np.ones(size * scale, dtype=np.float32)
    start = starts[index]
    if index > 0:
        shared = (starts[index - 1] + size - start) * scale
        weights[:shared] *= _ramp(shared)
    if index + 1 < len(starts):
        shared = (start + size - starts[index + 1]) * scale
        weights[size * scale - shared :] *= _ramp(shared)[::-1]
    return weights


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_tiled(
    engine: Engine,
    pixels: np.ndarray,
    settings: TileSettings,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> TiledResult:
    """Run `engine` over `pixels` (H, W, C float32) tile by tile; halve the tile on CUDA OOM."""
    tile = settings.tile or max(pixels.shape[:2])
    while True:
        try:
            out, count = _run_rows(engine, pixels, tile, settings, progress)
            return TiledResult(pixels=out, tile=tile, tiles=count)
        except torch.OutOfMemoryError:
            if tile // 2 < MIN_TILE:
                raise
            log.warning(
                "out of memory at tile %d on %s; retrying at %d", tile, engine.device, tile // 2
            )
            if engine.device.type == "cuda":
                torch.cuda.empty_cache()
            tile //= 2


def _run_rows(
    engine: Engine,
    pixels: np.ndarray,
    tile: int,
    settings: TileSettings,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, int]:
    """Accumulate weighted tiles into a buffer one tile-row high and flush finished rows."""
    height, width, channels = pixels.shape
    scale = engine.scale
    overlap = min(settings.overlap, tile)
    tile_h, tile_w = (
        tile_span(height, tile + overlap, overlap),
        tile_span(width, tile + overlap, overlap),
    )
    ys = tile_starts(height, tile_h, overlap)
    xs = tile_starts(width, tile_w, overlap)
    out = buffers.allocate(
        (height * scale, width * scale, channels),
        np.float32,
        max_bytes_in_ram=settings.max_bytes_in_ram,
        scratch_dir=settings.scratch_dir,
    )
    acc = np.zeros((tile_h * scale, width * scale, channels), dtype=np.float32)
    weights = np.zeros((tile_h * scale, width * scale, 1), dtype=np.float32)
    col_windows = [_window(xs, i, tile_w, scale) for i in range(len(xs))]
    total, done = len(ys) * len(xs), 0
    for row, y0 in enumerate(ys):
        row_window = _window(ys, row, tile_h, scale)
        for group in _batches(list(range(len(xs))), max(1, settings.batch)):
            batch = np.stack([pixels[y0 : y0 + tile_h, xs[i] : xs[i] + tile_w] for i in group])
            result = engine.infer(torch.from_numpy(batch.transpose(0, 3, 1, 2))).numpy()
            for i, tile_out in zip(group, result, strict=True):
                weight = row_window[:, None] * col_windows[i][None, :]
                x0 = xs[i] * scale
                acc[:, x0 : x0 + tile_w * scale] += tile_out.transpose(1, 2, 0) * weight[..., None]
                weights[:, x0 : x0 + tile_w * scale, 0] += weight
            done += len(group)
            if progress is not None:
                progress(done, total)
        next_y = ys[row + 1] if row + 1 < len(ys) else y0 + tile_h
        _flush(acc, weights, out, y0 * scale, (next_y - y0) * scale)
    return out, total


def _flush(acc: np.ndarray, weights: np.ndarray, out: np.ndarray, top: int, rows: int) -> None:
    """Normalise the first `rows` finished rows into `out` at `top`; shift the rest up.

    Dividing by the summed weights (rather than trusting the windows to sum to one) keeps the
    blend exact wherever three tiles meet, which the evenly spread tiles allow.
    """
    np.divide(acc[:rows], weights[:rows], out=out[top : top + rows])
    buffers.release_rows(out, top, top + rows)
    keep = acc.shape[0] - rows
    for buf in (acc, weights):
        if keep > 0:
            buf[:keep] = buf[rows:]
        buf[keep:] = 0.0


def luma(pixels: np.ndarray, settings: TileSettings) -> np.ndarray:
    """Luma of an RGB result, band by band, so a disk-backed output is never read whole."""
    out = buffers.allocate(
        (*pixels.shape[:2], 1),
        np.float32,
        max_bytes_in_ram=settings.max_bytes_in_ram,
        scratch_dir=settings.scratch_dir,
    )
    for top in range(0, pixels.shape[0], _LUMA_BAND_ROWS):
        bottom = min(top + _LUMA_BAND_ROWS, pixels.shape[0])
        np.matmul(pixels[top:bottom], _LUMA, out=out[top:bottom, :, 0])
        buffers.release_rows(pixels, top, bottom)
        buffers.release_rows(out, top, bottom)
    return out
