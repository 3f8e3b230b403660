"""TIFF: a decoder for single 8/16-bit grey or RGB images (tifffile, refusing what it would fill
with zeros) and a tiled Deflate writer that carries EXIF with its Exif/GPS sub-IFDs."""

from __future__ import annotations

import io
import logging
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import imagecodecs
import numpy as np
import tifffile

from pipeline.errors import DecodeError, UnsupportedImageError
from pipeline.image import directory, tags
from pipeline.image.banding import BAND_ROWS, bands
from pipeline.image.declarations import tiff_dpi
from pipeline.image.directory import DirectoryError, Entry, entry_int, read_header, read_ifd
from pipeline.image.metadata import exif_from_tiff
from pipeline.image.plugin import Decoded, Format, check_pixel_count, library_errors
from pipeline.image.values import Image, Metadata

__all__ = ["CLASSIC_TIFF_LIMIT", "FORMAT"]

_log = logging.getLogger(__name__)

_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PAGE_SCAN_LIMIT = 64
CLASSIC_TIFF_LIMIT = 2**32  # bytes a classic TIFF can address; beyond it we write BigTIFF
_BUFFER_BYTES = 32 << 20  # tiles tifffile may hold for its compression threads

_MIN_IS_WHITE, _YCBCR = 0, 6  # PhotometricInterpretation values
_LZW, _JPEG = 5, 7  # Compression values
_ASSOCIATED_ALPHA, _UNASSOCIATED_ALPHA = 1, 2  # ExtraSamples values
_COLOURS = {0: 1, 1: 1, 2: 3}  # MinIsWhite, MinIsBlack, RGB
_PHOTOMETRIC_NAMES = {
    3: "palette-colour",
    4: "transparency-mask",
    5: "CMYK (separated)",
    6: "YCbCr (not JPEG-compressed)",
    8: "CIE L*a*b*",
    9: "ICC L*a*b*",
    10: "ITU L*a*b*",
    32803: "colour-filter-array raw",
    32844: "LogL",
    32845: "LogLuv",
    34892: "linear raw",
}
_SAMPLE_FORMATS = {2: "signed-integer", 3: "floating-point", 5: "complex", 6: "complex"}


def _lzw_decode_checked(data: bytes, out: object = None, **options: object) -> object:
    """imagecodecs.lzw_decode left to size its output itself. Given a size, as tifffile gives
    it, imagecodecs 2026.3 writes past its buffer on some corrupt streams (a segfault, found
    by bench/fuzz.py); unsized, it measures the stream first and raises on the corruption."""
    if out is not None and not isinstance(out, int):
        return imagecodecs.lzw_decode(data, out=out, **options)
    decoded = imagecodecs.lzw_decode(data, **options)
    return decoded if out is None or len(decoded) <= out else decoded[:out]


class _CheckedDecompressors(Mapping[int, Callable[..., object]]):
    """tifffile's table of decompressors, with LZW through _lzw_decode_checked."""

    def __init__(self, table: Mapping[int, Callable[..., object]]) -> None:
        self._table = table

    def __getitem__(self, key: int) -> Callable[..., object]:
        return _lzw_decode_checked if key == _LZW else self._table[key]

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __iter__(self) -> Iterator[int]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


# tifffile takes every page's decompressor from this one process-wide table: no per-call hook.
if not isinstance(tifffile.TIFF.DECOMPRESSORS, _CheckedDecompressors):
    tifffile.TIFF.DECOMPRESSORS = _CheckedDecompressors(tifffile.TIFF.DECOMPRESSORS)


class _Samples(NamedTuple):
    colours: int
    has_alpha: bool
    premultiplied: bool
    invert: bool  # MinIsWhite: 0 is white


def _decode(path: Path, max_pixels: int) -> Decoded:
    with library_errors(path, "unreadable TIFF"), tifffile.TiffFile(path) as tif:
        page = _first_page(path, tif)
        check_pixel_count(path, page.imagewidth, page.imagelength, max_pixels)
        layout = _sample_layout(path, page)
        _check_segments(path, page, tif.filehandle.size)
        samples = _pixels(path, page, layout)
    metadata = _metadata(path)
    return Decoded(samples, layout.has_alpha, samples.itemsize * 8, metadata, layout.premultiplied)


def _first_page(path: Path, tif: tifffile.TiffFile) -> tifffile.TiffPage:
    """Return page 0, refusing files with more than one full-resolution image."""
    full_resolution = 0
    for index, page in enumerate(tif.pages):
        if index == _PAGE_SCAN_LIMIT:
            raise UnsupportedImageError(
                path, f"TIFF with more than {index} pages: only single images are restored"
            )
        if not page.subfiletype & 1:  # bit 0 marks a reduced-resolution copy (thumbnail, pyramid)
            full_resolution += 1
    if not len(tif.pages):
        raise DecodeError(path, "TIFF contains no readable image directory")
    if full_resolution > 1:
        raise UnsupportedImageError(
            path,
            f"multi-page TIFF with {full_resolution} full-resolution pages: "
            "only single images are restored",
        )
    first = tif.pages.first
    if first.subfiletype & 1:
        raise UnsupportedImageError(path, "TIFF whose first page is a reduced-resolution preview")
    return first


def _sample_layout(path: Path, page: tifffile.TiffPage) -> _Samples:
    photometric = int(page.photometric)
    colours = _COLOURS.get(photometric)
    if photometric == _YCBCR and page.compression == _JPEG:
        colours = 3  # tifffile decodes JPEG-compressed YCbCr to RGB
    if colours is None:
        name = _PHOTOMETRIC_NAMES.get(photometric, f"photometric {photometric}")
        raise UnsupportedImageError(path, f"{name} TIFF: this colour model is not supported")
    if page.sampleformat != 1:
        kind = _SAMPLE_FORMATS.get(int(page.sampleformat), f"format {page.sampleformat}")
        raise UnsupportedImageError(path, f"TIFF with {kind} samples: only unsigned integers")
    bits = page.bitspersample
    if bits == 1:
        raise UnsupportedImageError(path, "1-bit bilevel TIFF: restoration needs continuous tone")
    if bits not in (8, 16):
        raise UnsupportedImageError(
            path, f"{bits}-bit TIFF samples: only 8- and 16-bit samples are decoded faithfully"
        )
    if page.imagedepth > 1:
        raise UnsupportedImageError(path, "volumetric (3-D) TIFF")
    extra = page.samplesperpixel - colours
    kinds = tuple(int(k) for k in page.extrasamples)
    invert = photometric == _MIN_IS_WHITE
    if extra == 0:
        return _Samples(colours, False, False, invert)
    if extra == 1 and kinds in ((_ASSOCIATED_ALPHA,), (_UNASSOCIATED_ALPHA,)):
        return _Samples(colours, True, kinds == (_ASSOCIATED_ALPHA,), invert)
    raise UnsupportedImageError(
        path, f"TIFF with {extra} extra samples {kinds}: only one alpha channel is supported"
    )


def _check_segments(path: Path, page: tifffile.TiffPage, file_size: int) -> None:
    """Refuse missing or out-of-file strips/tiles: tifffile would fill them with zeros silently."""
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    planes = page.samplesperpixel if page.planarconfig == 2 else 1
    if page.is_tiled:
        across = math.ceil(page.imagewidth / page.tilewidth)
        expected = math.ceil(page.imagelength / page.tilelength) * across * planes
    else:
        rows = min(page.rowsperstrip or page.imagelength, page.imagelength)
        expected = math.ceil(page.imagelength / rows) * planes
    if offsets.size != expected or counts.size != expected:
        raise DecodeError(
            path, f"TIFF lists {offsets.size} image segments where its geometry needs {expected}"
        )
    bad = (offsets <= 0) | (counts <= 0) | (offsets + counts > file_size)
    if bad.any():
        raise DecodeError(
            path,
            f"TIFF image segment {int(np.argmax(bad))} is missing or lies past the end of the "
            "file (truncated?)",
        )


def _pixels(path: Path, page: tifffile.TiffPage, layout: _Samples) -> np.ndarray:
    samples = page.asarray()
    if page.axes.startswith("S"):  # planar configuration: (samples, rows, columns)
        samples = np.moveaxis(samples, 0, -1)
    if samples.ndim == 2:
        samples = samples[:, :, np.newaxis]
    channels = layout.colours + int(layout.has_alpha)
    if samples.shape != (page.imagelength, page.imagewidth, channels):
        raise DecodeError(path, f"TIFF decoded to shape {samples.shape}, not what it declares")
    if layout.invert:
        grey = samples[:, :, :1]
        np.subtract(np.iinfo(samples.dtype).max, grey, out=grey)
    return samples


def _metadata(path: Path) -> Metadata:
    """Read ICC, XMP, IPTC, resolution, orientation and the EXIF-worthy tags of page 0."""
    try:
        with (
            path.open("rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf,
        ):
            layout = read_header(buf)
            try:
                entries, _ = read_ifd(buf, layout.first_ifd, layout)
            except DirectoryError as exc:
                # IFD0 itself was readable (tifffile decoded it); only a sub-IFD is damaged.
                _log.warning("%s: EXIF/GPS directory unreadable, not carried: %s", path, exc)
                entries, _ = read_ifd(buf, layout.first_ifd, layout, follow=False)
    except (OSError, ValueError, struct.error) as exc:
        raise DecodeError(path, f"unreadable TIFF directory: {exc}") from exc
    found = {entry.tag: entry for entry in entries if entry.data is not None}
    orientation = (
        entry_int(found[tags.ORIENTATION], layout.order) if tags.ORIENTATION in found else 1
    )
    return Metadata(
        icc_profile=found[tags.ICC_PROFILE].data if tags.ICC_PROFILE in found else None,
        exif=exif_from_tiff(entries, layout.order),
        xmp=found[tags.XMP].data if tags.XMP in found else None,
        iptc=found[tags.IPTC].data if tags.IPTC in found else None,
        dpi=tiff_dpi(found, layout.order),
        orientation=orientation if orientation in range(1, 9) else 1,
    )


def _write(image: Image, path: Path, depth: int, quality: int, meta: Metadata) -> None:
    """Write a tiled (256x256), Deflate-compressed TIFF with a horizontal predictor.

    Deflate + predictor is lossless and read by libtiff, Photoshop, GIMP and ImageMagick; tiles
    let us feed tifffile one band of rows at a time. BigTIFF is chosen when 4 GB could be passed.
    """
    has_alpha = image.alpha is not None
    channels = image.channels + int(has_alpha)
    ifd0_tags, sub_ifds, exif_order = _exif_parts(meta.exif)
    big = _needs_bigtiff(image, channels, depth, meta)
    with tifffile.TiffWriter(path, bigtiff=big, byteorder="<") as writer:
        writer.write(
            _tiles(image, path, depth),
            shape=(image.height, image.width) + ((channels,) if channels > 1 else ()),
            dtype=np.uint16 if depth == 16 else np.uint8,
            photometric="rgb" if image.channels == 3 else "minisblack",
            extrasamples=("unassalpha",) if has_alpha else None,
            tile=(BAND_ROWS, BAND_ROWS),
            compression="zlib",
            predictor=True,
            iccprofile=meta.icc_profile,
            resolution=meta.dpi,
            resolutionunit="INCH" if meta.dpi else None,
            software=False,
            metadata=None,
            buffersize=_BUFFER_BYTES,  # the default (512 MiB) would keep many bands alive
            extratags=ifd0_tags + _blob_tags(meta),
        )
    if sub_ifds:
        _append_sub_ifds(path, sub_ifds, exif_order)


def _tiles(image: Image, path: Path, depth: int) -> Iterator[np.ndarray]:
    for band in bands(image, path, depth):
        if band.shape[2] == 1:
            band = band[:, :, 0]
        for left in range(0, image.width, BAND_ROWS):
            yield band[:, left : left + BAND_ROWS]


def _needs_bigtiff(image: Image, channels: int, depth: int, meta: Metadata) -> bool:
    raw = image.width * image.height * channels * depth // 8
    extra = sum(len(block or b"") for block in (meta.exif, meta.xmp, meta.iptc, meta.icc_profile))
    # Deflate can grow incompressible data slightly; keep a generous margin below 4 GiB.
    return raw + raw // 64 + extra + (1 << 24) >= CLASSIC_TIFF_LIMIT


def _exif_parts(exif: bytes | None) -> tuple[list[tuple], dict[int, tuple[Entry, ...]], str]:
    """Split a (patched) EXIF block into IFD0 tags for tifffile and sub-IFDs to append."""
    if not exif:
        return [], {}, "<"
    layout = read_header(exif)
    entries, _ = read_ifd(exif, layout.first_ifd, layout)
    extratags: list[tuple] = []
    sub_ifds: dict[int, tuple[Entry, ...]] = {}
    for entry in entries:
        if entry.tag in (tags.EXIF_IFD, tags.GPS_IFD) and entry.children is not None:
            sub_ifds[entry.tag] = entry.children
        elif (
            entry.tag not in tags.TIFF_STRUCTURE | tags.SUB_IFD_POINTERS and entry.data is not None
        ):
            extratags.append(_tifffile_tag(entry, layout.order))
    return extratags, sub_ifds, layout.order


def _tifffile_tag(entry: Entry, order: str) -> tuple:
    """An extratags tuple for tifffile; numbers are unpacked for tifffile to pack in file order."""
    assert entry.data is not None
    number = tags.NUMBER_FORMATS.get(entry.kind)
    if number is None:
        return (entry.tag, entry.kind, entry.count, entry.data, True)
    values = struct.unpack(
        f"{order}{len(entry.data) // struct.calcsize(number)}{number}", entry.data
    )
    return (entry.tag, entry.kind, entry.count, values, True)


def _blob_tags(meta: Metadata) -> list[tuple]:
    blobs: list[tuple] = []
    if meta.xmp:
        blobs.append((tags.XMP, tags.BYTE, len(meta.xmp), meta.xmp, True))  # per the XMP spec
    if meta.iptc:
        blobs.append((tags.IPTC, tags.UNDEFINED, len(meta.iptc), meta.iptc, True))  # raw bytes
    return blobs


def _append_sub_ifds(path: Path, sub_ifds: dict[int, tuple[Entry, ...]], source: str) -> None:
    """Append the Exif/GPS directories and a new IFD0 pointing at them to a written TIFF.

    tifffile refuses to write Exif/GPS pointer tags, so IFD0 is rewritten at the end of the
    file: its entries are copied verbatim (their values stay where tifffile put them), the
    pointers are added, and the header is pointed at the new table. The old table (a few
    hundred bytes) is left unreferenced.
    """
    with path.open("r+b") as handle:
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            layout = read_header(buf)
            entries, next_ifd = read_ifd(buf, layout.first_ifd, layout, follow=False)
            table = {e.tag: directory.raw_entry(buf, e, layout) for e in entries}
        pointer_type = tags.LONG8 if layout.big else tags.LONG
        for tag, children in sub_ifds.items():
            offset = _seek_end_aligned(handle)
            handle.write(directory.ifd_bytes(children, offset, source, layout.order, layout.big))
            table[tag] = directory.entry_head(tag, pointer_type, 1, layout) + struct.pack(
                layout.order + layout.word, offset
            )
        offset = _seek_end_aligned(handle)
        handle.write(directory.ifd_table(table.items(), next_ifd, layout))
        handle.seek(layout.first_ifd_pointer)
        handle.write(struct.pack(layout.order + layout.word, offset))


def _seek_end_aligned(handle: io.BufferedRandom) -> int:
    """Move to the end of the file, padded to a multiple of 8; return that offset."""
    end = handle.seek(0, os.SEEK_END)
    handle.write(bytes(-end % 8))
    return end + (-end % 8)


FORMAT = Format(
    name="tiff",
    suffix=".tif",
    aliases=("tif",),
    matches=lambda head: head[:4] in _MAGIC,
    decode=_decode,
    write=_write,
)
