"""Previews: what a browser is sent is 8-bit sRGB, colour-managed through the file's own ICC
profile (compared with LittleCMS's conversion through Pillow's ImageCms), cut from a cache
that is made once and never writes next to the originals."""

from __future__ import annotations

import hashlib
import io
import struct

import cv2
import numpy as np
import pytest
import tifffile
from conftest import shared_file
from PIL import Image, ImageCms, ImageOps

from daemon.web.previews import Pixels, PreviewCache, Region, crop, fit, overview
from pipeline.files import sha256_file

# ProPhoto RGB (ROMM): D50 white, its primaries' XYZ and a 1.8 gamma, as a v2 matrix/TRC
# profile (no such profile ships with Debian or sits in the corpus, so the test writes one).
_PROPHOTO = {
    "wtpt": (0.9642, 1.0, 0.8249),
    "rXYZ": (0.7977, 0.2880, 0.0),
    "gXYZ": (0.1352, 0.7119, 0.0),
    "bXYZ": (0.0313, 0.0001, 0.8249),
}


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def prophoto_icc() -> bytes:
    def xyz(values: tuple[float, float, float]) -> bytes:
        return b"XYZ " + bytes(4) + b"".join(_s15(v) for v in values)

    text = b"ProPhoto RGB (test)"
    tags = {
        b"desc": b"desc" + bytes(4) + struct.pack(">I", len(text) + 1) + text + b"\0"
        + bytes(4 + 4 + 2 + 1 + 67),
        b"cprt": b"text" + bytes(4) + b"public domain\0",
        **{name.encode(): xyz(values) for name, values in _PROPHOTO.items()},
        b"rTRC": b"curv" + bytes(4) + struct.pack(">IH", 1, round(1.8 * 256)) + bytes(2),
    }  # fmt: skip
    tags[b"gTRC"] = tags[b"bTRC"] = tags[b"rTRC"]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    table, data = struct.pack(">I", len(tags)), b""
    for name, body in tags.items():
        body += bytes(-len(body) % 4)
        table += name + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = 128 + table_size + len(data)
    header = (
        struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
        + bytes(12) + b"acsp" + bytes(24) + struct.pack(">I", 0)
        + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + bytes(48)
    )  # fmt: skip
    assert len(header) == 128
    return header + table + data


def _reference(rgb8: np.ndarray, icc: bytes) -> np.ndarray:
    """LittleCMS's conversion of the same 8-bit samples, through Pillow's ImageCms."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    converted = ImageCms.profileToProfile(
        Image.fromarray(rgb8), source, ImageCms.createProfile("sRGB"), outputMode="RGB"
    )
    return np.asarray(converted)


def whole(pixels: Pixels) -> np.ndarray:
    return pixels.window(0, pixels.shape[0], 0, pixels.shape[1])


@pytest.fixture
def cache(tmp_path) -> PreviewCache:
    return PreviewCache(tmp_path / "previews", max_bytes=64 << 20, max_pixels=50_000_000)


def test_a_16_bit_prophoto_tiff_previews_as_its_imagecms_srgb_conversion(tmp_path, cache):
    # Real 16-bit samples from the corpus, declared ProPhoto.
    samples = tifffile.imread(shared_file("corpus/metadata_edge_cases/pillow_tiff_16bit_RGB.tiff"))
    assert samples.dtype == np.uint16 and samples.ndim == 3
    icc = prophoto_icc()
    path = tmp_path / "prophoto16.tif"
    tifffile.imwrite(path, samples, photometric="rgb", iccprofile=icc)
    before = sha256_file(path)
    preview = whole(cache.pixels(path, before))
    eight = ((samples.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    expected = _reference(eight, icc)
    assert preview.shape == expected.shape and preview.dtype == np.uint8
    assert np.abs(preview.astype(int) - expected).max() <= 1
    # The profile mattered: ProPhoto samples shown as if sRGB would be far off.
    assert np.abs(eight.astype(int) - expected).mean() > 5
    assert sha256_file(path) == before  # only read
    made = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p != path)
    assert made == [f"{before}.overview.npy", f"{before}.tif"]
    assert all(p.parent == cache.folder for p in tmp_path.rglob("*") if p.name in made)


def test_a_16_bit_adobe_rgb_png_from_the_corpus_previews_through_its_profile(cache):
    path = shared_file("corpus/metadata_edge_cases/resr_tree_alpha_16bit.png")
    with Image.open(path) as image:
        icc = image.info["icc_profile"]
        truncated = np.asarray(image.convert("RGB"))  # Pillow keeps each sample's high byte
    assert b"Adobe RGB" in icc
    # The 16-bit samples through another decoder (OpenCV's libpng), rounded to 8 bits.
    samples = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:, :, 2::-1]
    assert samples.dtype == np.uint16
    eight = ((samples.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    assert np.abs(eight.astype(int) - truncated).max() <= 1
    preview = whole(cache.pixels(path, sha256_file(path)))
    assert np.abs(preview.astype(int) - _reference(eight, icc)).max() <= 1
    assert np.abs(preview.astype(int) - eight).max() > 3


def test_overviews_and_crops_are_cut_from_the_cache(tmp_path, cache):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (900, 1500, 3), dtype=np.uint8)
    path = tmp_path / "plain.png"
    Image.fromarray(pixels).save(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    full = cache.pixels(path, sha)
    assert np.array_equal(whole(full), pixels)  # no profile: taken as sRGB, exactly
    small = cache.overview(path, sha)
    assert (small.shape[1], small.shape[0]) == fit(1500, 900, 2048) == (1500, 900)
    assert overview(small, (300, 180), Image.Resampling.LANCZOS).size == (300, 180)
    part = crop(full, Region(10, 20, 30, 40), (1500, 900), None)
    assert np.array_equal(np.asarray(part), pixels[20:60, 10:40])
    # The original at half the output's size, enlarged with its own pixels (nearest).
    half = pixels[::2, ::2]
    enlarged = crop(half, Region(100, 50, 8, 6), (1500, 900), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(enlarged)[::2, ::2], half[25:28, 50:54])


@pytest.mark.parametrize("layout", [{"tile": (256, 256)}, {"rowsperstrip": 64}])
def test_a_tiff_is_read_band_by_band_into_the_same_pixels(tmp_path, cache, layout):
    # Sizes that are no multiple of the tile or strip: the edge blocks are padded in the file.
    samples = np.random.default_rng(1).integers(0, 65536, (600, 500, 3), dtype=np.uint16)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, samples, photometric="rgb", compression="zlib", **layout)
    preview = whole(cache.pixels(path, sha256_file(path)))
    expected = ((samples.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    assert np.array_equal(preview, expected)
    small = cache.overview(path, sha256_file(path))
    assert small.shape == (600, 500, 3)


def test_a_jpeg_overview_shrinks_while_decoding_and_makes_no_full_size_copy(tmp_path, cache):
    rng = np.random.default_rng(2)
    pixels = np.clip(
        np.linspace(0, 255, 4200)[None, :, None] + rng.normal(0, 8, (2400, 4200, 3)), 0, 255
    ).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    small = cache.overview(path, sha256_file(path))
    assert (small.shape[1], small.shape[0]) == fit(4200, 2400, 2048)
    with Image.open(path) as image:
        expected = np.asarray(image.resize((small.shape[1], small.shape[0]), Image.LANCZOS))
    assert np.abs(small.astype(int) - expected).mean() < 2
    assert not list(cache.folder.glob("*.tif"))  # zoom crops alone render the full size


def test_an_exif_rotated_jpeg_previews_upright(tmp_path, cache):
    pixels = np.random.default_rng(3).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to show
    Image.fromarray(pixels).save(path, quality=100, exif=exif)
    assert cache.size(path) == (60, 100)
    with Image.open(path) as image:
        upright = np.asarray(ImageOps.exif_transpose(image))
    preview = whole(cache.pixels(path, sha256_file(path)))
    assert preview.shape == upright.shape == (100, 60, 3)
    assert np.abs(preview.astype(int) - upright).mean() < 2


def test_the_cache_drops_the_least_recently_used_beyond_its_bound(tmp_path):
    rng = np.random.default_rng(4)
    paths = []
    for name in "abc":
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    cache = PreviewCache(tmp_path / "previews", max_bytes=1_200_000, max_pixels=10**6)
    for path in paths:
        cache.pixels(path, path.stem)  # ~960 KB each (copy and overview; noise)
    left = sorted(p.name for p in cache.folder.iterdir())
    assert left == ["c.overview.npy", "c.tif"]
    assert sum(p.stat().st_size for p in cache.folder.iterdir()) <= 1_200_000


@pytest.mark.parametrize("lossless", [False, True])
def test_a_webp_is_decoded_in_bands_that_equal_a_whole_decode(
    tmp_path, cache, monkeypatch, lossless
):
    from daemon.web import webpbands

    if not webpbands.available():
        pytest.skip("no libwebp to load (neither the system's nor Pillow's)")
    monkeypatch.setattr(webpbands, "_BAND_BYTES", 256 * 700 * 3)  # four bands, not one
    rng = np.random.default_rng(5)
    pixels = np.clip(
        np.linspace(0, 255, 700)[None, :, None] + rng.normal(0, 20, (900, 700, 3)), 0, 255
    ).astype(np.uint8)
    path = tmp_path / "photo.webp"
    Image.fromarray(pixels).save(path, lossless=lossless, quality=90)
    size, rows = webpbands.bands(path)
    bands = list(rows)
    assert size == (700, 900) and [b.shape[0] for b in bands] == [256, 256, 256, 132]
    with Image.open(path) as image:
        decoded = np.asarray(image.convert("RGB"))
    assert np.array_equal(np.concatenate(bands), decoded)  # also at the bands' edges
    assert np.array_equal(whole(cache.pixels(path, sha256_file(path))), decoded)
