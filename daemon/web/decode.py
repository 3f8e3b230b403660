"""Reading an original or an output a band of rows at a time, never whole: TIFF strip by strip or
tile row by tile row (tifffile), PNG and JPEG through libvips' sequential loaders (pyvips), WebP
in cropped bands through libwebp (daemon.web.webpbands); JPEG and WebP shrunk while they decode
(DCT scaling, libwebp's) when only an overview is wanted."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BAND_ROWS", "DecodeError", "Source", "bands", "probe"]

BAND_ROWS = 256  # rows handed on at a time (bounds the memory of a colour transform)
_SAMPLES = {"uchar": np.uint8, "ushort": np.uint16}
_SHRINKS = {"jpegload": (8, 4, 2), "webpload": (8, 4, 2)}  # formats that shrink on load


class DecodeError(Exception):
    """The file cannot be read as an image (unreadable, too large, unsupported samples)."""


@dataclass(frozen=True)
class Source:
    """A file's header: its size as shown (after its EXIF orientation), its loader and its
    embedded ICC profile."""

    path: Path
    width: int
    height: int
    loader: str  # "tiff" or the libvips loader's name
    icc: bytes | None
    oriented: bool  # an EXIF orientation other than 1 is applied


def _vips():
    import pyvips

    # The server keeps no decoded pixels between requests: libvips' operation cache would.
    pyvips.cache_set_max(0)
    return pyvips


def probe(path: Path, max_pixels: int) -> Source:
    """The header only; refuses an image of more than `max_pixels` before anything decodes."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            source = _probe_tiff(path)
        else:
            source = _probe_vips(path)
    except OSError as exc:
        raise DecodeError(f"{path}: cannot be read: {exc}") from exc
    if source.width * source.height > max_pixels:
        raise DecodeError(
            f"{path}: {source.width}x{source.height} is more than {max_pixels} pixels"
        )
    return source


def _probe_tiff(path: Path) -> Source:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tag = page.tags.get(34675)  # InterColorProfile
            icc = bytes(tag.value) if tag is not None else None
            return Source(path, page.imagewidth, page.imagelength, "tiff", icc, False)
    except (tifffile.TiffFileError, ValueError, IndexError) as exc:
        raise DecodeError(f"{path}: not a readable TIFF: {exc}") from exc


def _probe_vips(path: Path) -> Source:
    pyvips = _vips()
    try:
        image = pyvips.Image.new_from_file(str(path))  # the header; no pixels yet
        loader = image.get("vips-loader")
    except pyvips.Error as exc:
        raise DecodeError(f"{path}: not a readable image: {exc.message.strip()}") from None
    orientation = image.get("orientation") if image.get_typeof("orientation") else 1
    oriented = orientation in range(2, 9)
    width, height = image.width, image.height
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    icc = image.get("icc-profile-data") if image.get_typeof("icc-profile-data") else None
    return Source(path, width, height, loader, icc, oriented)


def shrink_for(source: Source, long_side: int) -> int:
    """The largest factor the loader can shrink by while decoding that still leaves at least
    `long_side` pixels (1 where it cannot shrink)."""
    longest = max(source.width, source.height)
    for factor in _SHRINKS.get(source.loader, ()):
        if longest // factor >= long_side:
            return factor
    return 1


def bands(source: Source, *, shrink: int = 1) -> tuple[tuple[int, int], Iterator[np.ndarray]]:
    """The image's size (after `shrink`) and its rows, a band at a time, at their own depth:
    (rows, width) for grey, (rows, width, samples) otherwise."""
    if source.loader == "tiff":
        return (source.width, source.height), _tiff_bands(source)
    if source.loader == "webpload" and shrink == 1 and not source.oriented:
        from daemon.web import webpbands

        cropped = webpbands.bands(source.path, unit=BAND_ROWS)
        if cropped is not None:
            return cropped[0], _reported(source, cropped[1])
    return _vips_bands(source, shrink)


def _reported(source: Source, rows: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    try:
        yield from rows
    except OSError as exc:
        raise DecodeError(str(exc)) from None


def _vips_bands(source: Source, shrink: int) -> tuple[tuple[int, int], Iterator[np.ndarray]]:
    pyvips = _vips()
    # A rotated image needs rows from anywhere: libvips then decodes to a temporary file
    # on disk (beyond its 100 MB threshold), never to memory.
    options: dict[str, object] = {"access": "random" if source.oriented else "sequential"}
    if shrink > 1:
        options["shrink"] = shrink
    try:
        image = pyvips.Image.new_from_file(str(source.path), **options)
        if source.oriented:
            image = image.autorot()
        if image.interpretation == "cmyk":  # browsers and the sRGB transform want RGB
            image = image.icc_transform("srgb", embedded=True)
    except pyvips.Error as exc:
        raise DecodeError(f"{source.path}: cannot be decoded: {exc.message.strip()}") from None
    if image.format not in _SAMPLES:
        raise DecodeError(f"{source.path}: {image.format} samples cannot be previewed")
    dtype = _SAMPLES[image.format]

    def rows() -> Iterator[np.ndarray]:
        region = pyvips.Region.new(image)
        for top in range(0, image.height, BAND_ROWS):
            count = min(BAND_ROWS, image.height - top)
            try:
                data = region.fetch(0, top, image.width, count)
            except pyvips.Error as exc:
                raise DecodeError(
                    f"{source.path}: cannot be decoded: {exc.message.strip()}"
                ) from None
            band = np.frombuffer(data, dtype).reshape(count, image.width, image.bands)
            yield band[:, :, 0] if image.bands == 1 else band

    return (image.width, image.height), rows()


def _tiff_bands(source: Source) -> Iterator[np.ndarray]:
    """Each strip, or each row of tiles, as it is decoded (tifffile's segments, in order)."""
    import tifffile

    with tifffile.TiffFile(source.path) as tif:
        page = tif.pages[0]
        if page.planarconfig != 1 or page.imagedepth > 1:  # separate planes: whole, rarely
            yield page.asarray()
            return
        rows = page.tilelength if page.is_tiled else (page.rowsperstrip or source.height)
        band: np.ndarray | None = None
        top = 0
        # A small read buffer: tifffile would otherwise read 256 MiB of compressed data ahead.
        for data, index, _shape in page.segments(maxworkers=1, buffersize=8 << 20):
            y, x = index[2], index[3]
            if band is None or y != top:
                if band is not None:
                    yield band
                top = y
                height = min(rows, source.height - y)
                band = np.zeros((height, source.width, *data.shape[3:]), data.dtype)
            block = data[0, : band.shape[0], : source.width - x]
            band[:, x : x + block.shape[1]] = block
        if band is not None:
            yield band
