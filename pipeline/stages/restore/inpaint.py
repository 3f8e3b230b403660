"""Inpainting the defect mask: OpenCV (Telea or Navier-Stokes) over tiles holding masked
pixels, or a LaMa model with surrounding context."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import torch

from pipeline import buffers
from pipeline.stages.restore.shared import LUMA
from pipeline.tiling import Engine

__all__ = ["LAMA_CONTEXT", "LAMA_TILE", "inpaint_opencv", "inpaint_tile_lama", "tiles_with_mask"]

_INPAINT_TILE = 256
LAMA_TILE, LAMA_CONTEXT = 384, 64


def tiles_with_mask(
    mask: np.ndarray, tile: int, context: int
) -> Iterator[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """(core, padded) slices of each tile holding masked pixels; the padding gives the
    inpainter the surroundings it reads, so tiles agree where they meet."""
    height, width = mask.shape
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            core = (slice(top, min(height, top + tile)), slice(left, min(width, left + tile)))
            if not mask[core].any():
                continue
            padded = (
                slice(max(0, top - context), min(height, top + tile + context)),
                slice(max(0, left - context), min(width, left + tile + context)),
            )
            yield core, padded


def inpaint_opencv(out: np.ndarray, mask: np.ndarray, method: str, radius: int) -> None:
    """Fill the masked pixels of `out` in place, tile by tile, channel by channel.

    Telea runs on 16-bit samples: OpenCV 5's float32 Telea returns values far outside the
    neighbours' range (measured: 1.9 for neighbours near 0.9), while its 16-bit path is sound
    and keeps 16-bit masters at their own precision. Navier-Stokes runs in float32."""
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    reach = max(3, radius + 1)
    context = 4 * reach + 8
    done = 0  # rows above this are finished: a disk-backed `out` lets their pages go
    for core, padded in tiles_with_mask(mask, _INPAINT_TILE, context):
        if padded[0].start > done:
            buffers.release_rows(out, done, padded[0].start)
            done = padded[0].start
        holes = np.ascontiguousarray(mask[padded])
        inner = _inner(core, padded)
        chosen = holes[inner] > 0
        for channel in range(out.shape[2]):
            source = out[padded[0], padded[1], channel]
            if flag == cv2.INPAINT_TELEA:
                samples = np.rint(source * 65535.0).astype(np.uint16)
                filled = cv2.inpaint(samples, holes, reach, flag).astype(np.float32) / 65535.0
            else:
                filled = cv2.inpaint(np.ascontiguousarray(source), holes, reach, flag)
            target = out[core[0], core[1], channel]  # a view: writes land in `out`
            target[chosen] = np.clip(filled[inner][chosen], 0.0, 1.0)


def _inner(core: tuple[slice, slice], padded: tuple[slice, slice]) -> tuple[slice, slice]:
    """`core` in the coordinates of the `padded` crop."""
    return tuple(
        slice(c.start - p.start, c.stop - p.start) for c, p in zip(core, padded, strict=True)
    )  # type: ignore[return-value]


@torch.inference_mode()
def inpaint_tile_lama(
    engine: Engine,
    out: np.ndarray,
    mask: np.ndarray,
    core: tuple[slice, slice],
    padded: tuple[slice, slice],
) -> None:
    """Fill one tile's masked pixels with an inpainting model, reading the padded context."""
    crop = out[padded]
    grey = crop.shape[2] == 1
    rgb = np.repeat(crop, 3, axis=2) if grey else crop
    image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
    holes = torch.from_numpy((mask[padded] > 0).astype(np.float32))[None, None]
    image, holes = image.to(engine.device), holes.to(engine.device)
    dtype = torch.float16 if engine.precision == "fp16" else torch.float32
    image, holes = image.to(dtype), holes.to(dtype)
    if engine.precision == "bf16":
        with torch.autocast(engine.device.type, dtype=torch.bfloat16):
            result = engine.descriptor(image, holes)
    else:
        result = engine.descriptor(image, holes)
    filled = result[0].float().clamp_(0, 1).cpu().numpy().transpose(1, 2, 0)
    if grey:
        filled = (filled @ LUMA)[:, :, None]
    inner = _inner(core, padded)
    chosen = mask[core] > 0
    target = out[core]
    target[chosen] = filled[inner][chosen]
