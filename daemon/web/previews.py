"""Previews a browser can show: any original or output rendered to 8-bit sRGB (colour-managed
through its embedded ICC profile with LittleCMS, via Pillow's ImageCms) into a cache under the
state folder: a small overview, and for zoom a tiled, compressed full-size copy that crops are
read from a tile at a time. No image is ever decoded whole (see daemon.web.decode); the cache is
kept under its bound by dropping the least recently used. Originals and outputs are only read."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageCms

from daemon.web import decode

__all__ = ["Layer", "Pixels", "PreviewCache", "PreviewError", "Region", "to_srgb"]

Layer = Literal["output", "original", "lanczos", "mask"]
OVERVIEW_PX = 2048  # long side of an overview
MAX_CROP_PX = 2048  # long side of a crop, in output pixels
_TILE = 256  # the cached full-size copy's tiles (and the rows converted at a time)
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
class Pixels:
    """A rendered full-size preview in the cache (a tiled TIFF), read a window at a time: a
    window decodes only the tiles it touches."""

    path: Path
    shape: tuple[int, ...]  # (height, width) for a mask, (height, width, 3) otherwise

    def window(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        import pyvips

        try:
            image = pyvips.Image.new_from_file(str(self.path), access="random")
            part = image.crop(left, top, right - left, bottom - top)
            data = part.write_to_memory()
        except pyvips.Error as exc:
            raise PreviewError(f"preview cache unreadable: {exc.message.strip()}") from None
        return np.frombuffer(data, np.uint8).reshape(bottom - top, right - left, *self.shape[2:])


def _to_8bit(block: np.ndarray) -> np.ndarray:
    """(rows, width[, samples]) as 8-bit grey or RGB."""
    if block.ndim == 3:
        block = block[:, :, :3] if block.shape[2] >= 3 else block[:, :, 0]
    if block.dtype == np.uint16:
        return ((block.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if block.dtype != np.uint8:
        raise PreviewError(f"{block.dtype} samples cannot be previewed")
    return block


def _grey(block: np.ndarray) -> np.ndarray:
    eight = _to_8bit(block)
    return eight[:, :, 0] if eight.ndim == 3 else eight


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


def _converted(
    rows: Iterator[np.ndarray], transform: ImageCms.ImageCmsTransform | None, *, mask: bool
) -> Iterator[np.ndarray]:
    """Bands at their own depth as 8-bit sRGB RGB (grey for a mask), in bands of _TILE rows
    (a TIFF's strips or tile rows come in its own heights)."""
    pending: list[np.ndarray] = []
    count = 0

    def convert(block: np.ndarray) -> np.ndarray:
        band = Image.fromarray(np.ascontiguousarray(_to_8bit(block)))
        return np.asarray(band.convert("L")) if mask else to_srgb(band, transform)

    for block in rows:
        pending.append(block)
        count += block.shape[0]
        while count >= _TILE:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield convert(joined[:_TILE])
            rest = joined[_TILE:]
            pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
    if count:
        yield convert(np.concatenate(pending) if len(pending) > 1 else pending[0])


class _Reducer:
    """Collects every k-th row and column of the bands going past (k at most half the
    reduction), then resizes that with Lanczos to the overview's size."""

    def __init__(self, size: tuple[int, int], view: tuple[int, int]) -> None:
        self.k = max(1, min(size[0] // view[0], size[1] // view[1]) // 2)
        self.view = view
        self._rows: list[np.ndarray] = []
        self._top = 0

    def add(self, band: np.ndarray) -> np.ndarray:
        self._rows.append(np.ascontiguousarray(band[-self._top % self.k :: self.k, :: self.k]))
        self._top += band.shape[0]
        return band

    def result(self) -> np.ndarray:
        image = Image.fromarray(np.concatenate(self._rows))
        return np.asarray(image.resize(self.view, Image.Resampling.LANCZOS))


class PreviewCache:
    """Rendered previews keyed by the file's SHA-256 (a file the store vouches for never
    changes under its hash). One render at a time, so concurrent requests for big images do
    not add up in memory; the folder is kept under `max_bytes` by dropping the least recently
    used (the render just made is kept even where it alone is larger)."""

    def __init__(self, folder: Path, *, max_bytes: int, max_pixels: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._lock = threading.Lock()

    def size(self, path: Path) -> tuple[int, int]:
        """The file's width and height as shown (its header only)."""
        source = self._probe(path)
        return source.width, source.height

    def overview(self, path: Path, sha256: str, *, mask: bool = False) -> np.ndarray:
        """The file's 8-bit sRGB pixels (grey for a mask) at most OVERVIEW_PX on the long side:
        what zoomed-out views are cut from. JPEG and WebP shrink while they decode."""
        small = self._name(sha256, mask, ".overview.npy")
        if not small.exists():
            with self._lock:
                if not small.exists():
                    self._render(path, None, small, mask=mask)
        try:
            os.utime(small)  # recently used: dropped last
            return np.load(small)
        except (OSError, ValueError) as exc:
            raise PreviewError(f"{path}: preview cache unreadable: {exc}") from exc

    def pixels(self, path: Path, sha256: str, *, mask: bool = False) -> Pixels:
        """The same at full size, for crops: rendered once into a tiled TIFF in the cache."""
        full = self._name(sha256, mask, ".tif")
        small = self._name(sha256, mask, ".overview.npy")
        if not full.exists():
            with self._lock:
                if not full.exists():
                    self._render(path, full, None if small.exists() else small, mask=mask)
        try:
            os.utime(full)
            cached = decode.probe(full, self.max_pixels)
        except (OSError, decode.DecodeError) as exc:
            raise PreviewError(f"{path}: preview cache unreadable: {exc}") from exc
        height, width = cached.height, cached.width
        return Pixels(full, (height, width) if mask else (height, width, 3))

    def marked_share(self, path: Path) -> float:
        """The share of a mask's pixels above half (streamed; nothing cached)."""
        source = self._probe(path)
        try:
            _, rows = decode.bands(source)
            marked = sum(int(np.count_nonzero(_grey(band) > 127)) for band in rows)
        except decode.DecodeError as exc:
            raise PreviewError(str(exc)) from None
        return marked / max(1, source.width * source.height)

    def _name(self, sha256: str, mask: bool, suffix: str) -> Path:
        return self.folder / f"{sha256}{'.mask' if mask else ''}{suffix}"

    def _probe(self, path: Path) -> decode.Source:
        try:
            return decode.probe(path, self.max_pixels)
        except decode.DecodeError as exc:
            raise PreviewError(str(exc)) from None

    def _render(self, path: Path, full: Path | None, small: Path | None, *, mask: bool) -> None:
        """Stream the file once, converting band by band: into a tiled TIFF at `full` (when
        asked), and reduced into `small` (when asked; shrunk on load when only it is)."""
        source = self._probe(path)
        view = fit(source.width, source.height, OVERVIEW_PX)
        shrink = decode.shrink_for(source, OVERVIEW_PX) if full is None else 1
        transform = None if mask else _transform(source.icc)
        self.folder.mkdir(parents=True, exist_ok=True)
        made = [name for name in (full, small) if name is not None]
        tag = f".{os.getpid()}.{threading.get_ident()}.tmp"
        temps = [name.with_name(name.name + tag) for name in made]
        try:
            size, rows = decode.bands(source, shrink=shrink)
            reducer = _Reducer(size, view)
            bands = (reducer.add(band) for band in _converted(rows, transform, mask=mask))
            if full is not None:
                _write_tiled(temps[0], bands, size, mask=mask)
            else:
                for _ in bands:
                    pass
            if small is not None:
                with open(temps[-1], "wb") as handle:
                    np.save(handle, reducer.result())
        except BaseException as exc:
            for temp in temps:
                temp.unlink(missing_ok=True)
            if isinstance(exc, decode.DecodeError):
                raise PreviewError(str(exc)) from None
            raise
        for temp, name in zip(temps, made, strict=True):
            os.replace(temp, name)
        self._trim(keep=set(made))

    def _trim(self, *, keep: set[Path]) -> None:
        entries = []
        for path in self.folder.iterdir():
            if path.suffix in (".npy", ".tif"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path not in keep:
                path.unlink(missing_ok=True)
                total -= size


def _write_tiled(
    path: Path, bands: Iterator[np.ndarray], size: tuple[int, int], *, mask: bool
) -> None:
    """Bands of _TILE rows as a tiled, Deflate-compressed TIFF, a row of tiles at a time."""
    import tifffile

    width, height = size
    samples = () if mask else (3,)
    padded_width = -(-width // _TILE) * _TILE

    def tiles() -> Iterator[np.ndarray]:
        for band in bands:
            padded = np.zeros((_TILE, padded_width, *samples), np.uint8)
            padded[: band.shape[0], :width] = band
            for left in range(0, width, _TILE):
                yield padded[:, left : left + _TILE]

    tifffile.imwrite(
        path, tiles(), shape=(height, width, *samples), dtype=np.uint8,
        photometric="minisblack" if mask else "rgb", tile=(_TILE, _TILE),
        compression="zlib", compressionargs={"level": 1}, predictor=True,
        bigtiff=width * height * (1 if mask else 3) > 3 << 30, maxworkers=1,
    )  # fmt: skip


def fit(width: int, height: int, long_side: int) -> tuple[int, int]:
    scale = min(1.0, long_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def overview(pixels: np.ndarray, size: tuple[int, int], resample: int) -> Image.Image:
    """An overview's pixels resized to `size` (w, h)."""
    image = Image.fromarray(np.asarray(pixels))
    return image if image.size == size else image.resize(size, resample)


def _window(pixels: np.ndarray | Pixels, top: int, bottom: int, left: int, right: int):
    if isinstance(pixels, Pixels):
        return pixels.window(top, bottom, left, right)
    return np.ascontiguousarray(pixels[top:bottom, left:right])


def crop(
    pixels: np.ndarray | Pixels,
    region: Region,
    output_size: tuple[int, int],
    resample: int | None,
    out_size: tuple[int, int] | None = None,
) -> Image.Image:
    """The part of an image shown over `region` of the output (output pixels). An image the
    size of the output is cut as it is; a smaller one (the original) is enlarged to the output's
    scale with `resample` (NEAREST: its own pixels, LANCZOS: a plain resize). Only the window
    read is decoded from a cached full-size preview."""
    height, width = pixels.shape[:2]
    size = out_size or (region.w, region.h)
    if (width, height) == output_size:
        part = _window(pixels, region.y, region.y + region.h, region.x, region.x + region.w)
        image = Image.fromarray(part)
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
    sx, sy = width / output_size[0], height / output_size[1]
    x0, y0 = region.x * sx, region.y * sy
    x1, y1 = (region.x + region.w) * sx, (region.y + region.h) * sy
    margin = 4  # Lanczos reads 3 pixels beyond the box
    left, top = max(0, int(x0) - margin), max(0, int(y0) - margin)
    right, bottom = min(width, int(np.ceil(x1)) + margin), min(height, int(np.ceil(y1)) + margin)
    part = Image.fromarray(_window(pixels, top, bottom, left, right))
    box = (x0 - left, y0 - top, x1 - left, y1 - top)
    return part.resize(size, Image.Resampling.LANCZOS if resample is None else resample, box=box)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
