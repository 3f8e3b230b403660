"""A still WebP decoded a band of rows at a time through libwebp's public decoding API (ctypes):
each band is a cropped decode into a buffer of its own, so memory holds one band, never the
whole image (libvips and Pillow both decode a WebP whole). libwebp reads from the top to a
crop's last row, so bands are made large (a bounded number of them) to keep the time low."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["available", "bands"]

_ABI = 0x0209  # WEBP_DECODER_ABI_VERSION since libwebp 1.0
_MODE_RGB = 0
_MARGIN = 2  # rows decoded beyond a band's edges (even: crops start on an even row)
_BAND_BYTES = 96 << 20  # one band's RGB samples at most (rounded to whole multiples of `unit`)


class _Features(ctypes.Structure):
    _fields_ = [
        ("width", ctypes.c_int),
        ("height", ctypes.c_int),
        ("has_alpha", ctypes.c_int),
        ("has_animation", ctypes.c_int),
        ("format", ctypes.c_int),
        ("pad", ctypes.c_uint32 * 5),
    ]


class _RGBA(ctypes.Structure):
    _fields_ = [
        ("rgba", ctypes.c_void_p),
        ("stride", ctypes.c_int),
        ("size", ctypes.c_size_t),
    ]


class _YUVA(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("y", "u", "v", "a")),
        *((name, ctypes.c_int) for name in ("y_stride", "u_stride", "v_stride", "a_stride")),
        *((name, ctypes.c_size_t) for name in ("y_size", "u_size", "v_size", "a_size")),
    ]


class _Buffers(ctypes.Union):
    _fields_ = [("RGBA", _RGBA), ("YUVA", _YUVA)]


class _Output(ctypes.Structure):
    _fields_ = [
        ("colorspace", ctypes.c_int),
        ("width", ctypes.c_int),
        ("height", ctypes.c_int),
        ("is_external_memory", ctypes.c_int),
        ("u", _Buffers),
        ("pad", ctypes.c_uint32 * 4),
        ("private_memory", ctypes.c_void_p),
    ]


class _Options(ctypes.Structure):
    _fields_ = [
        *(
            (name, ctypes.c_int)
            for name in (
                "bypass_filtering", "no_fancy_upsampling", "use_cropping", "crop_left",
                "crop_top", "crop_width", "crop_height", "use_scaling", "scaled_width",
                "scaled_height", "use_threads", "dithering_strength", "flip",
                "alpha_dithering_strength",
            )
        ),
        ("pad", ctypes.c_uint32 * 5),
    ]  # fmt: skip


class _Config(ctypes.Structure):
    _fields_ = [("input", _Features), ("output", _Output), ("options", _Options)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The system's libwebp, else the copy Pillow's wheel ships; None if neither loads."""
    import PIL

    candidates = [ctypes.util.find_library("webp")]
    candidates += sorted(glob.glob(os.path.join(os.path.dirname(PIL.__file__), "..",
                                                "pillow.libs", "libwebp-*.so*")))  # fmt: skip
    for candidate in candidates:
        if not candidate:
            continue
        try:
            lib = ctypes.CDLL(candidate)
            lib.WebPInitDecoderConfigInternal.argtypes = [ctypes.POINTER(_Config), ctypes.c_int]
            lib.WebPGetFeaturesInternal.argtypes = [
                ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_Features), ctypes.c_int
            ]  # fmt: skip
            lib.WebPDecode.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_Config)]
            config = _Config()
            if lib.WebPInitDecoderConfigInternal(ctypes.byref(config), _ABI):
                return lib
        except (OSError, AttributeError):
            continue
    return None


def available() -> bool:
    return _library() is not None


def bands(path: Path, *, unit: int = 256) -> tuple[tuple[int, int], Iterator[np.ndarray]] | None:
    """The WebP's size and its RGB rows in bands (a multiple of `unit` rows, the last one
    shorter); None where libwebp cannot decode it this way (no library, an animation)."""
    lib = _library()
    if lib is None:
        return None
    data = path.read_bytes()  # compressed: a small fraction of the decoded size
    config = _Config()
    if not lib.WebPInitDecoderConfigInternal(ctypes.byref(config), _ABI):
        return None
    if lib.WebPGetFeaturesInternal(data, len(data), ctypes.byref(config.input), _ABI):
        return None  # not a WebP libwebp can read: the caller's decoder reports why
    width, height = config.input.width, config.input.height
    if config.input.has_animation or width <= 0 or height <= 0:
        return None
    rows = max(unit, _BAND_BYTES // (width * 3) // unit * unit)

    def decode() -> Iterator[np.ndarray]:
        for top in range(0, height, rows):
            count = min(rows, height - top)
            # Two rows more on each side: libwebp's chroma upsampling at a crop's edge has no
            # neighbour row, so the band's own first and last rows come out as in a whole decode.
            start, stop = max(0, top - _MARGIN), min(height, top + count + _MARGIN)
            band = np.empty((stop - start, width, 3), np.uint8)
            config = _Config()
            lib.WebPInitDecoderConfigInternal(ctypes.byref(config), _ABI)
            options = config.options
            options.use_cropping, options.crop_left, options.crop_top = 1, 0, start
            options.crop_width, options.crop_height = width, stop - start
            output = config.output
            output.colorspace, output.is_external_memory = _MODE_RGB, 1
            output.u.RGBA.rgba = band.ctypes.data
            output.u.RGBA.stride, output.u.RGBA.size = width * 3, band.nbytes
            status = lib.WebPDecode(data, len(data), ctypes.byref(config))
            if status != 0:
                raise OSError(f"{path}: libwebp could not decode rows {top}-{top + count} "
                              f"(status {status})")  # fmt: skip
            yield band[top - start : top - start + count]

    return (width, height), decode()
