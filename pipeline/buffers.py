"""Disk-backed pixel buffers for outputs too large to hold in RAM, and page release helpers."""

from __future__ import annotations

import mmap
import tempfile
from pathlib import Path

import numpy as np


def allocate(
    shape: tuple[int, ...],
    dtype: np.dtype | type,
    *,
    max_bytes_in_ram: int,
    scratch_dir: Path | str | None,
) -> np.ndarray:
    """A zeroed array in RAM, or a file-backed memmap when it would exceed `max_bytes_in_ram`.

    The backing file is unlinked straight away, so it disappears with the last reference even
    if the process is killed.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes <= max_bytes_in_ram:
        return np.zeros(shape, dtype=dtype)
    with tempfile.TemporaryFile(dir=scratch_dir, prefix=".scanrestore-buf-") as handle:
        handle.truncate(nbytes)
        return np.memmap(handle, dtype=dtype, mode="w+", shape=shape)


def copy(
    pixels: np.ndarray,
    *,
    max_bytes_in_ram: int,
    scratch_dir: Path | str | None,
    channels: int | None = None,
    band_rows: int = 256,
) -> np.ndarray:
    """A float32 copy of (H, W, C) `pixels` from `allocate`, written band by band and each band's
    pages released (source and copy), so neither a disk-backed source nor a disk-backed copy is
    ever resident whole. With `channels`, a one-channel source is broadcast to that many."""
    out = allocate(
        (*pixels.shape[:2], channels or pixels.shape[2]),
        np.float32,
        max_bytes_in_ram=max_bytes_in_ram,
        scratch_dir=scratch_dir,
    )
    for top in range(0, pixels.shape[0], band_rows):
        bottom = min(top + band_rows, pixels.shape[0])
        out[top:bottom] = pixels[top:bottom]
        release_rows(pixels, top, bottom)
        release_rows(out, top, bottom)
    return out


def release_rows(array: np.ndarray, start: int, stop: int) -> None:
    """Write back and drop the resident pages of rows [start, stop) of a memmap; no-op in RAM.

    Pages of a shared file mapping count towards RSS while resident; dropping them after each
    strip keeps RSS bounded by the strip, not the image. The data stays in the file.
    """
    base = array
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        if base.base is None:
            return
        base = base.base
    if not isinstance(base, np.memmap) or not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        return
    row_bytes = int(np.prod(base.shape[1:])) * base.dtype.itemsize
    page = mmap.PAGESIZE
    begin = (base.offset + start * row_bytes) // page * page
    end = base.offset + stop * row_bytes
    length = end - begin
    if length <= 0:
        return
    base._mmap.flush(begin, min(length, len(base._mmap) - begin))
    base._mmap.madvise(mmap.MADV_DONTNEED, begin, min(length, len(base._mmap) - begin))
