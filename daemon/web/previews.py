"""Previews a browser can show: any original or output rendered once to 8-bit sRGB (colour-managed
through its embedded ICC profile with LittleCMS, via Pillow's ImageCms) and kept in a cache
under the state folder, bounded in size; overviews and native-resolution crops are cut from it.
Originals and outputs are only ever read."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps

__all__ = ["Layer", "PreviewCache", "PreviewError", "Region", "to_srgb"]

Layer = Literal["output", "original", "lanczos", "mask"]
OVERVIEW_PX = 2048  # long side of an overview
MAX_CROP_PX = 2048  # long side of a crop, in output pixels
_BAND_ROWS = 256  # rows converted at a time (bounds the memory of a colour transform)
_SRGB = ImageCms.createProfile("sRGB")


class PreviewError(Exception):
    """The file cannot be previewed (unreadable, too large, not an image)."""


@dataclass(frozen=True)
class Region:
    """A crop in output pixels: x, y, width, height."""

    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class _Tiff:
    """A TIFF read strip by strip or tile row by tile row (never decoded whole)."""

    path: Path
    width: int
    height: int


def _tiff_icc(path: Path) -> bytes | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags.get(34675)  # InterColorProfile
        return bytes(tag.value) if tag is not None else None


def _to_8bit(block: np.ndarray) -> np.ndarray:
    """(rows, width[, samples]) as 8-bit grey or RGB."""
    if block.ndim == 3:
        block = block[:, :, :3] if block.shape[2] >= 3 else block[:, :, 0]
    if block.dtype == np.uint16:
        return ((block.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if block.dtype != np.uint8:
        raise PreviewError(f"{block.dtype} samples cannot be previewed")
    return block


def _tiff_bands(source: _Tiff) -> Iterator[Image.Image]:
    """Each strip, or each row of tiles, as it is decoded (tifffile's segments, in order)."""
    import tifffile

    with tifffile.TiffFile(source.path) as tif:
        page = tif.pages[0]
        if page.planarconfig != 1 or page.imagedepth > 1:  # separate planes: whole, rarely
            yield Image.fromarray(_to_8bit(page.asarray()))
            return
        rows = page.tilelength if page.is_tiled else (page.rowsperstrip or source.height)
        band: np.ndarray | None = None
        top = 0
        # A small read buffer: tifffile would otherwise read 256 MiB of compressed data ahead.
        for data, index, _shape in page.segments(maxworkers=1, buffersize=8 << 20):
            y, x = index[2], index[3]
            if band is None or y != top:
                if band is not None:
                    yield Image.fromarray(_to_8bit(band))
                top = y
                height = min(rows, source.height - y)
                band = np.zeros((height, source.width, *data.shape[3:]), data.dtype)
            block = data[0, : band.shape[0], : source.width - x]
            band[:, x : x + block.shape[1]] = block
        if band is not None:
            yield Image.fromarray(_to_8bit(band))


def _open(path: Path, max_pixels: int) -> tuple[Image.Image | _Tiff, bytes | None]:
    """The decoded image (Pillow's), or a TIFF to be read band by band, and its ICC
    profile."""
    # This process's bound is the config's (checked below before decoding), not Pillow's.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_pixels)
    try:
        with Image.open(path) as probe:
            width, height = probe.size
            fmt = probe.format
        if width * height > max_pixels:
            raise PreviewError(f"{path}: {width}x{height} is more than {max_pixels} pixels")
        if fmt == "TIFF":
            return _Tiff(path, width, height), _tiff_icc(path)
        image = Image.open(path)
        image.load()
        icc = image.info.get("icc_profile")
        ImageOps.exif_transpose(image, in_place=True)  # a copy would double the memory
        return image, icc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PreviewError(f"{path}: cannot be previewed: {exc}") from exc


def _bands(decoded: Image.Image | _Tiff) -> tuple[tuple[int, int], Iterator[Image.Image]]:
    """The image's size and its rows as 8-bit L or RGB images, a band at a time."""
    if isinstance(decoded, _Tiff):
        return (decoded.width, decoded.height), _tiff_bands(decoded)
    width, height = decoded.size
    mode = "L" if decoded.mode in ("L", "I;16", "I", "1", "LA") else "RGB"

    def rows() -> Iterator[Image.Image]:
        for start in range(0, height, _BAND_ROWS):
            band = decoded.crop((0, start, width, min(height, start + _BAND_ROWS)))
            yield band if band.mode == mode else band.convert(mode)

    return (width, height), rows()


def _transform(icc: bytes | None) -> ImageCms.ImageCmsTransform | None:
    """LittleCMS's transform from the embedded RGB profile to sRGB; None when there is no
    profile to honour (none, not RGB, or broken: shown unmanaged rather than not at all)."""
    if not icc:
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != "RGB":
            return None
        return ImageCms.buildTransform(profile, _SRGB, "RGB", "RGB")
    except (OSError, ImageCms.PyCMSError):
        return None


def to_srgb(band: Image.Image, transform: ImageCms.ImageCmsTransform | None) -> np.ndarray:
    """One band as 8-bit sRGB RGB samples."""
    if band.mode == "L":
        band = band.convert("RGB")
    if transform is not None:
        band = ImageCms.applyTransform(band, transform)
    return np.asarray(band)


class PreviewCache:
    """Rendered previews keyed by the file's SHA-256 (a file the store vouches for never
    changes under its hash). One render at a time, so concurrent requests for big images do
    not add up in memory; the folder is kept under `max_bytes` by dropping the oldest."""

    def __init__(self, folder: Path, *, max_bytes: int, max_pixels: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._lock = threading.Lock()

    def pixels(self, path: Path, sha256: str, *, mask: bool = False) -> np.ndarray:
        """The file's 8-bit sRGB pixels (grey for a mask), memory-mapped from the cache."""
        return self._cached(path, sha256, mask=mask, overview=False)

    def overview(self, path: Path, sha256: str, *, mask: bool = False) -> np.ndarray:
        """The same at most OVERVIEW_PX on the long side (what zoomed-out views are cut from,
        so they never touch the full-size pixels)."""
        return self._cached(path, sha256, mask=mask, overview=True)

    def _cached(self, path: Path, sha256: str, *, mask: bool, overview: bool) -> np.ndarray:
        stem = self.folder / f"{sha256}{'.mask' if mask else ''}"
        full, small = stem.with_suffix(".npy"), stem.with_suffix(".overview.npy")
        if not (full.exists() and small.exists()):
            with self._lock:
                if not (full.exists() and small.exists()):
                    self._render(path, full, small, mask=mask)
        name = small if overview else full
        try:
            os.utime(name)  # recently used: dropped last
            return np.load(name, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise PreviewError(f"{path}: preview cache unreadable: {exc}") from exc

    def _render(self, path: Path, full: Path, small: Path, *, mask: bool) -> None:
        """Decode once; write the 8-bit sRGB rows band by band into `full` (never a second
        whole copy in memory) and keep a reduced copy for `small`."""
        decoded, icc = _open(path, self.max_pixels)
        (width, height), bands = _bands(decoded)
        transform = None if mask else _transform(icc)
        channels = 1 if mask else 3
        shape = (height, width) if mask else (height, width, 3)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._trim(width * height * channels)
        view = fit(width, height, OVERVIEW_PX)
        # Every k-th row and column is kept (k at most half the reduction, the rest Lanczos).
        k = max(1, min(width // view[0], height // view[1]) // 2)
        reduced: list[np.ndarray] = []
        temp = full.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with open(temp, "wb") as handle:
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(handle, header)
            top = 0
            for band in bands:
                rows = np.asarray(band.convert("L")) if mask else to_srgb(band, transform)
                handle.write(np.ascontiguousarray(rows).tobytes())
                reduced.append(np.ascontiguousarray(rows[-top % k :: k, ::k]))
                top += rows.shape[0]
        del decoded
        small_pixels = np.asarray(
            Image.fromarray(np.concatenate(reduced)).resize(view, Image.Resampling.LANCZOS)
        )
        small_temp = small.with_suffix(f".{os.getpid()}.tmp")
        with open(small_temp, "wb") as handle:
            np.save(handle, small_pixels)
        os.replace(temp, full)
        os.replace(small_temp, small)

    def _trim(self, incoming: int) -> None:
        entries = sorted(
            (p.stat().st_mtime, p.stat().st_size, p) for p in self.folder.glob("*.npy")
        )
        total = sum(size for _, size, _ in entries) + incoming
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def fit(width: int, height: int, long_side: int) -> tuple[int, int]:
    scale = min(1.0, long_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def overview(pixels: np.ndarray, size: tuple[int, int], resample: int) -> Image.Image:
    """An overview's pixels resized to `size` (w, h)."""
    image = Image.fromarray(np.asarray(pixels))
    return image if image.size == size else image.resize(size, resample)


def crop(
    pixels: np.ndarray,
    region: Region,
    output_size: tuple[int, int],
    resample: int | None,
    out_size: tuple[int, int] | None = None,
) -> Image.Image:
    """The part of an image shown over `region` of the output (output pixels). An image the
    size of the output is cut as it is; a smaller one (the original) is enlarged to the output's
    scale with `resample` (NEAREST: its own pixels, LANCZOS: a plain resize)."""
    height, width = pixels.shape[:2]
    size = out_size or (region.w, region.h)
    if (width, height) == output_size:
        part = pixels[region.y : region.y + region.h, region.x : region.x + region.w]
        image = Image.fromarray(np.ascontiguousarray(part))
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
    sx, sy = width / output_size[0], height / output_size[1]
    x0, y0 = region.x * sx, region.y * sy
    x1, y1 = (region.x + region.w) * sx, (region.y + region.h) * sy
    margin = 4  # Lanczos reads 3 pixels beyond the box
    left, top = max(0, int(x0) - margin), max(0, int(y0) - margin)
    right, bottom = min(width, int(np.ceil(x1)) + margin), min(height, int(np.ceil(y1)) + margin)
    part = Image.fromarray(np.ascontiguousarray(pixels[top:bottom, left:right]))
    box = (x0 - left, y0 - top, x1 - left, y1 - top)
    return part.resize(size, Image.Resampling.LANCZOS if resample is None else resample, box=box)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
