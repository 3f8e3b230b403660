"""Behaviour of pipeline.image on files built here: precision, channels, orientation, metadata."""

from __future__ import annotations

import io
import logging
import mmap
import struct
import threading
import zlib
from dataclasses import replace
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import piexif
import pytest
import tifffile
from PIL import Image as PILImage
from PIL import ImageCms, ImageOps

from pipeline import image as image_module
from pipeline.errors import DecodeError, EncodeError, ImageTooLargeError, UnsupportedImageError
from pipeline.image import (
    FORMATS,
    Image,
    Metadata,
    decode,
    encode,
    format_from_name,
    formats,
    suffix_for,
)
from pipeline.image.formats import tiff as tiff_format

LOSSLESS = ("png", "tiff")
RNG = np.random.default_rng(20240611)


def make_image(
    pixels: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    bit_depth: int = 8,
    fmt: str = "png",
    metadata: Metadata | None = None,
) -> Image:
    return Image(
        pixels.astype(np.float32),
        None if alpha is None else alpha.astype(np.float32),
        bit_depth,
        fmt,
        metadata or Metadata(),
    )


def random_levels(shape: tuple[int, ...], depth: int) -> np.ndarray:
    top = 65535 if depth == 16 else 255
    return RNG.integers(0, top + 1, shape, dtype=np.uint16 if depth == 16 else np.uint8)


def to_unit(levels: np.ndarray, depth: int) -> np.ndarray:
    return levels.astype(np.float32) / (65535 if depth == 16 else 255)


def to_levels(values: np.ndarray, depth: int) -> np.ndarray:
    scale = 65535 if depth == 16 else 255
    return np.rint(values.astype(np.float64) * scale).astype(np.int64)


def upscale(image: Image) -> Image:
    """What a 2x stage does: new pixels, new size, same metadata."""
    size = (image.width * 2, image.height * 2)
    pixels = cv2.resize(image.pixels, size, interpolation=cv2.INTER_LINEAR)
    alpha = None if image.alpha is None else cv2.resize(image.alpha, size)
    return image.replace(pixels=pixels.reshape(size[1], size[0], -1), alpha=alpha)


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def quadrants(height: int = 32, width: int = 48) -> np.ndarray:
    """An upright test card: four flat, distinct colours, so any turn or mirror shows."""
    card = np.zeros((height, width, 3), np.uint8)
    colours = [(230, 30, 30), (30, 200, 40), (40, 60, 220), (240, 220, 40)]
    for index, colour in enumerate(colours):
        rows = slice(0, height // 2) if index < 2 else slice(height // 2, height)
        cols = slice(0, width // 2) if index % 2 == 0 else slice(width // 2, width)
        card[rows, cols] = colour
    return card


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --- formats and names -----------------------------------------------------------------------


def test_format_names_and_suffixes_map_both_ways():
    assert [suffix_for(fmt) for fmt in FORMATS] == [".jpg", ".png", ".tif", ".webp"]
    names = {"jpeg": "jpeg", "JPG": "jpeg", ".png": "png", "tiff": "tiff", "tif": "tiff"}
    for name, fmt in names.items():
        assert format_from_name(name) == fmt
    assert format_from_name("webp") == "webp"
    with pytest.raises(ValueError, match="bmp"):
        format_from_name("bmp")
    with pytest.raises(ValueError, match="gif"):
        suffix_for("gif")


def test_the_format_registry_refuses_a_name_or_alias_already_taken():
    png = formats.REGISTRY["png"]
    with pytest.raises(ValueError, match="'png' is already registered"):
        formats.register(png)
    with pytest.raises(ValueError, match="'tif' is already registered"):
        formats.register(replace(png, name="other", aliases=("tif",)))
    assert tuple(formats.REGISTRY) == FORMATS


def test_format_is_detected_from_content_not_the_name(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    PILImage.fromarray(quadrants()).save(path, "PNG")
    assert decode(path).format == "png"


# --- precision, channels, alpha ---------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 3, 4], ids=["grey", "grey+alpha", "rgb", "rgba"])
@pytest.mark.parametrize("fmt", LOSSLESS)
def test_sixteen_bit_round_trip_is_bit_exact(tmp_path, fmt, channels):
    levels = random_levels((37, 53, channels), 16)
    colours = 1 if channels < 3 else 3
    alpha = to_unit(levels[:, :, colours], 16) if channels in (2, 4) else None
    source = make_image(to_unit(levels[:, :, :colours], 16), alpha=alpha, bit_depth=16, fmt=fmt)
    path = tmp_path / f"out{suffix_for(fmt)}"

    assert encode(source, path) == fmt
    back = decode(path)

    assert back.bit_depth == 16
    assert back.channels == colours
    stored = np.dstack(
        [to_levels(back.pixels, 16)] + ([] if alpha is None else [to_levels(back.alpha, 16)])
    )
    np.testing.assert_array_equal(stored, levels)
    # An independent reader sees the same 16-bit samples in the file itself.
    reread = imagecodecs.png_decode(path.read_bytes()) if fmt == "png" else tifffile.imread(path)
    np.testing.assert_array_equal(reread.reshape(levels.shape), levels)


def test_sixteen_bit_png_from_another_writer_decodes_at_full_precision(tmp_path):
    levels = random_levels((20, 30, 3), 16)
    path = tmp_path / "opencv.png"
    cv2.imwrite(str(path), levels[:, :, ::-1])  # OpenCV writes BGR

    decoded = decode(path)

    assert decoded.bit_depth == 16
    np.testing.assert_array_equal(to_levels(decoded.pixels, 16), levels)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"compression": "lzw", "rowsperstrip": 7},
        {"compression": "zlib", "tile": (16, 16), "predictor": True},
        {"planarconfig": "separate"},
        {"byteorder": ">"},
        {"bigtiff": True},
    ],
    ids=["plain", "lzw-strips", "deflate-tiles", "planar", "big-endian", "bigtiff"],
)
def test_sixteen_bit_tiff_layouts_decode_exactly(tmp_path, options):
    levels = random_levels((40, 50, 3), 16)
    path = tmp_path / "layout.tif"
    writer_options = {
        key: value for key, value in options.items() if key not in ("byteorder", "bigtiff")
    }
    with tifffile.TiffWriter(
        path, byteorder=options.get("byteorder", "<"), bigtiff=options.get("bigtiff", False)
    ) as tif:
        data = np.moveaxis(levels, -1, 0) if options.get("planarconfig") else levels
        tif.write(data, photometric="rgb", **writer_options)

    decoded = decode(path)

    assert decoded.bit_depth == 16
    np.testing.assert_array_equal(to_levels(decoded.pixels, 16), levels)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "tiff"])
def test_greyscale_stays_single_channel(tmp_path, fmt):
    source = tmp_path / f"grey{suffix_for(fmt)}"
    PILImage.fromarray(quadrants()[:, :, 0]).save(source)

    decoded = decode(source)
    output = tmp_path / f"out{suffix_for(fmt)}"
    encode(upscale(decoded), output)

    assert decoded.channels == 1
    assert decode(output).channels == 1
    assert PILImage.open(output).mode == "L"


@pytest.mark.parametrize("fmt", ["png", "tiff", "webp"])
@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "rgb"])
def test_alpha_is_preserved(tmp_path, fmt, channels):
    levels = random_levels((24, 32, channels), 8)
    alpha = np.tile(np.linspace(0, 255, 32).round().astype(np.uint8), (24, 1))
    source = make_image(to_unit(levels, 8), alpha=to_unit(alpha, 8), fmt=fmt)
    path = tmp_path / f"out{suffix_for(fmt)}"

    encode(source, path)
    back = decode(path)

    assert back.alpha is not None
    np.testing.assert_array_equal(to_levels(back.alpha, 8), alpha)
    if fmt != "webp":  # lossy colour; its alpha is lossless at alpha_quality 100
        np.testing.assert_array_equal(to_levels(back.pixels, 8), levels)


def test_jpeg_output_drops_alpha_and_says_so(tmp_path, caplog):
    source = make_image(to_unit(quadrants(), 8), alpha=np.full((32, 48), 0.5), fmt="jpeg")

    with caplog.at_level(logging.WARNING, logger="pipeline.image"):
        encode(source, tmp_path / "out.jpg")

    assert decode(tmp_path / "out.jpg").alpha is None
    assert "alpha" in caplog.text


def test_premultiplied_tiff_alpha_becomes_straight_alpha(tmp_path):
    colour = np.full((4, 4, 3), 200, np.uint8)
    alpha = np.full((4, 4, 1), 128, np.uint8)
    premultiplied = np.rint(colour * (alpha / 255.0)).astype(np.uint8)
    path = tmp_path / "assoc.tif"
    tifffile.imwrite(
        path, np.dstack([premultiplied, alpha]), photometric="rgb", extrasamples=["assocalpha"]
    )

    decoded = decode(path)

    np.testing.assert_allclose(decoded.pixels, 200 / 255, atol=1 / 255)
    np.testing.assert_allclose(decoded.alpha, 128 / 255, atol=1e-6)


def test_min_is_white_tiff_is_inverted_to_normal_grey(tmp_path):
    levels = random_levels((10, 12), 8)
    path = tmp_path / "miniswhite.tif"
    tifffile.imwrite(path, 255 - levels, photometric="miniswhite")

    np.testing.assert_array_equal(to_levels(decode(path).pixels[:, :, 0], 8), levels)


def test_palette_png_expands_to_rgb_with_its_transparency(tmp_path):
    palette_image = PILImage.fromarray(quadrants()).convert(
        "P", palette=PILImage.Palette.ADAPTIVE, colors=4
    )
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=0)

    decoded = decode(path)
    expected = np.asarray(PILImage.open(path).convert("RGBA"))  # Pillow applies tRNS too

    assert decoded.channels == 3 and decoded.alpha is not None
    np.testing.assert_array_equal(to_levels(decoded.pixels, 8), expected[:, :, :3])
    np.testing.assert_array_equal(to_levels(decoded.alpha, 8), expected[:, :, 3])


def test_encode_rounds_after_clipping(tmp_path):
    values = np.array([[[-0.2], [0.0], [0.5 / 255], [0.5], [1.0], [1.7]]], np.float32)

    encode(make_image(values), tmp_path / "levels.png")

    written = np.asarray(PILImage.open(tmp_path / "levels.png"))
    assert written[0].tolist() == [0, 0, 0, 128, 255, 255]  # rint: 0.5 -> 0 and 127.5 -> 128


def test_encode_refuses_non_finite_pixels(tmp_path):
    pixels = np.zeros((4, 4, 3), np.float32)
    pixels[2, 2, 1] = np.nan
    with pytest.raises(EncodeError, match="NaN"):
        encode(make_image(pixels), tmp_path / "nan.png")


def test_sixteen_bit_source_written_as_jpeg_or_webp_is_eight_bit(tmp_path):
    source = make_image(to_unit(random_levels((8, 8, 3), 16), 16), bit_depth=16, fmt="png")

    for fmt in ("jpeg", "webp"):
        path = tmp_path / f"out{suffix_for(fmt)}"
        assert encode(source, path, format=fmt) == fmt
        assert decode(path).bit_depth == 8
        with pytest.raises(EncodeError, match="8-bit"):
            encode(source, path, format=fmt, bit_depth=16)


def test_bit_depth_can_be_requested_for_lossless_output(tmp_path):
    source = make_image(to_unit(random_levels((8, 8, 3), 8), 8))
    encode(source, tmp_path / "deep.png", bit_depth=16)
    assert decode(tmp_path / "deep.png").bit_depth == 16


@pytest.mark.parametrize(("fmt", "width"), [("webp", 16384), ("jpeg", 65501)])
def test_encode_refuses_sizes_the_format_cannot_hold(tmp_path, fmt, width):
    path = tmp_path / f"wide{suffix_for(fmt)}"
    with pytest.raises(EncodeError) as info:
        encode(make_image(np.zeros((1, width, 1))), path, format=fmt)
    assert str(path) in str(info.value) and str(width) in str(info.value)


# --- orientation ------------------------------------------------------------------------------

# The stored image for each orientation is the upright card with the inverse of the turn a viewer
# applies; Pillow's exif_transpose (an independent implementation) must recover the card.
STORED_FROM_UPRIGHT = {
    1: None,
    2: PILImage.Transpose.FLIP_LEFT_RIGHT,
    3: PILImage.Transpose.ROTATE_180,
    4: PILImage.Transpose.FLIP_TOP_BOTTOM,
    5: PILImage.Transpose.TRANSPOSE,
    6: PILImage.Transpose.ROTATE_90,
    7: PILImage.Transpose.TRANSVERSE,
    8: PILImage.Transpose.ROTATE_270,
}


def save_oriented(path: Path, fmt: str, orientation: int) -> np.ndarray:
    upright = PILImage.fromarray(quadrants())
    turn = STORED_FROM_UPRIGHT[orientation]
    stored = upright if turn is None else upright.transpose(turn)
    if fmt == "tiff":
        stored.save(path, "TIFF", tiffinfo={274: orientation})
    else:
        options = {"lossless": True} if fmt == "webp" else {"quality": 98, "subsampling": 0}
        stored.save(path, fmt.upper(), exif=piexif.dump({"0th": {274: orientation}}), **options)
    oracle = np.asarray(ImageOps.exif_transpose(PILImage.open(path)).convert("RGB"))
    assert np.abs(oracle.astype(int) - quadrants()).mean() < 2, "test file built wrongly"
    return np.asarray(upright)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_exif_orientation_is_made_upright(tmp_path, fmt, orientation):
    path = tmp_path / f"oriented{suffix_for(fmt)}"
    upright = save_oriented(path, fmt, orientation)

    decoded = decode(path)

    assert decoded.metadata.orientation == orientation
    assert decoded.pixels.shape == upright.shape
    assert np.abs(to_levels(decoded.pixels, 8) - upright).mean() < 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_orientation_is_applied_once_and_output_says_one(tmp_path, fmt):
    path = tmp_path / f"oriented{suffix_for(fmt)}"
    save_oriented(path, fmt, 6)
    decoded = decode(path)
    output = tmp_path / f"out{suffix_for(fmt)}"

    encode(decoded, output)
    again = decode(output)

    assert again.metadata.orientation == 1
    assert again.pixels.shape == decoded.pixels.shape
    assert np.abs(again.pixels - decoded.pixels).mean() < (0.001 if fmt in LOSSLESS else 0.03)
    assert ImageOps.exif_transpose(PILImage.open(output)).size == (decoded.width, decoded.height)


def test_xmp_orientation_counts_when_exif_has_none_and_is_reset(tmp_path):
    packet = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description '
        b'tiff:Orientation="6" exif:PixelXDimension="48" exif:PixelYDimension="32" '
        b'dc:note="keep me"/></rdf:RDF></x:xmpmeta>'
    )
    stored = PILImage.fromarray(quadrants()).transpose(PILImage.Transpose.ROTATE_90)
    source = tmp_path / "xmp.jpg"
    stored.save(source, quality=98, subsampling=0, xmp=packet)

    decoded = decode(source)

    assert decoded.metadata.orientation == 6
    assert np.abs(to_levels(decoded.pixels, 8) - quadrants()).mean() < 2
    for fmt in FORMATS:
        output = tmp_path / f"out{suffix_for(fmt)}"
        encode(upscale(decoded), output)
        xmp = decode(output).metadata.xmp
        assert b'tiff:Orientation="1"' in xmp
        assert b'exif:PixelXDimension="96"' in xmp and b'exif:PixelYDimension="64"' in xmp
        assert b'dc:note="keep me"' in xmp


# --- ICC, EXIF, XMP, IPTC ---------------------------------------------------------------------


@pytest.mark.parametrize("icc_size", ["real", "multi-segment"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_icc_profile_bytes_are_identical_after_encode(tmp_path, fmt, icc_size):
    icc = srgb_profile()
    if icc_size == "multi-segment":  # beyond one JPEG APP2 segment
        icc += bytes(range(256)) * 300
    source = make_image(to_unit(quadrants(), 8), fmt=fmt, metadata=Metadata(icc_profile=icc))
    path = tmp_path / f"out{suffix_for(fmt)}"

    encode(source, path)

    assert decode(path).metadata.icc_profile == icc
    assert PILImage.open(path).info["icc_profile"] == icc  # an independent reader agrees


def camera_exif(orientation: int = 6, maker_note: bytes = b"MAKER\x00" + bytes(range(64))) -> bytes:
    thumbnail = io.BytesIO()
    PILImage.fromarray(quadrants(16, 16)).save(thumbnail, "JPEG")
    return piexif.dump(
        {
            "0th": {
                piexif.ImageIFD.Make: b"Scanner Co",
                piexif.ImageIFD.Model: b"Archive 9000",
                piexif.ImageIFD.Orientation: orientation,
                piexif.ImageIFD.Artist: b"Museum technician",
                piexif.ImageIFD.XResolution: (600, 1),
                piexif.ImageIFD.YResolution: (600, 1),
                piexif.ImageIFD.ResolutionUnit: 2,
            },
            "Exif": {
                piexif.ExifIFD.DateTimeOriginal: b"1921:05:04 10:00:00",
                piexif.ExifIFD.PixelXDimension: 32,
                piexif.ExifIFD.PixelYDimension: 48,
                piexif.ExifIFD.MakerNote: maker_note,
                piexif.ExifIFD.UserComment: b"ASCII\x00\x00\x00glass plate 17",
            },
            "GPS": {
                piexif.GPSIFD.GPSLatitudeRef: b"N",
                piexif.GPSIFD.GPSLatitude: ((51, 1), (30, 1), (0, 1)),
            },
            "1st": {piexif.ImageIFD.XResolution: (72, 1)},
            "thumbnail": thumbnail.getvalue(),
        }
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_exif_is_kept_with_new_size_orientation_one_and_no_thumbnail(tmp_path, fmt):
    source = tmp_path / "camera.jpg"
    stored = PILImage.fromarray(quadrants()).transpose(PILImage.Transpose.ROTATE_90)
    stored.save(source, quality=98, exif=camera_exif())
    before = piexif.load(str(source))
    decoded = decode(source)
    output = tmp_path / f"out{suffix_for(fmt)}"

    encode(upscale(decoded), output, format=fmt)
    after = piexif.load(b"Exif\x00\x00" + decode(output).metadata.exif)

    assert after["0th"][piexif.ImageIFD.Orientation] == 1
    assert after["Exif"][piexif.ExifIFD.PixelXDimension] == 96
    assert after["Exif"][piexif.ExifIFD.PixelYDimension] == 64
    assert after["1st"] == {} and after["thumbnail"] is None
    for ifd in ("0th", "Exif", "GPS"):
        moved = {piexif.ImageIFD.Orientation, piexif.ImageIFD.ExifTag, piexif.ImageIFD.GPSTag}
        moved |= {piexif.ExifIFD.PixelXDimension, piexif.ExifIFD.PixelYDimension}
        for tag, value in before[ifd].items():
            if tag not in moved:
                assert after[ifd].get(tag) == value, (ifd, tag)
    if fmt == "tiff":  # Pillow finds the appended Exif IFD through IFD0 of the TIFF itself
        exif_ifd = PILImage.open(output).getexif().get_ifd(0x8769)
        assert exif_ifd[piexif.ExifIFD.DateTimeOriginal] == "1921:05:04 10:00:00"
        assert exif_ifd[piexif.ExifIFD.PixelXDimension] == 96


def test_exif_is_patched_in_place_so_maker_note_offsets_stay_valid(tmp_path):
    maker_note = b"Nikon\x00\x02\x10\x00\x00" + bytes(range(200))
    source = tmp_path / "camera.jpg"
    PILImage.fromarray(quadrants()).save(source, exif=camera_exif(1, maker_note))
    decoded = decode(source)

    encode(upscale(decoded), tmp_path / "out.jpg")
    block_in, block_out = decoded.metadata.exif, decode(tmp_path / "out.jpg").metadata.exif

    # Maker notes address their own data by absolute offset; they must not move.
    assert block_out.find(maker_note) == block_in.find(maker_note) > 0
    assert len(block_out) <= len(block_in)  # the thumbnail at the end is cut off


def test_pixel_dimension_widens_from_short_to_long_when_needed(tmp_path):
    # IFD0: one pointer to the Exif IFD at 26; Exif IFD: PixelXDimension as a SHORT of 10.
    exif = (
        b"MM\x00*\x00\x00\x00\x08" + b"\x00\x01" + struct.pack(">HHII", 34665, 4, 1, 26) + bytes(4)
    )
    exif += b"\x00\x01" + struct.pack(">HHIHH", 0xA002, 3, 1, 10, 0) + bytes(4)
    wide = make_image(np.zeros((1, 70000, 1)), metadata=Metadata(exif=exif))

    encode(wide, tmp_path / "wide.png")

    after = piexif.load(b"Exif\x00\x00" + decode(tmp_path / "wide.png").metadata.exif)
    assert after["Exif"][piexif.ExifIFD.PixelXDimension] == 70000


HOSTILE_EXIF = b"II*\x00\xff\xff\xff\x7f" + bytes(16)  # first directory far outside the block


def test_unparseable_exif_refuses_the_file_naming_it(tmp_path):
    source = tmp_path / "hostile.png"
    PILImage.fromarray(quadrants()).save(source, exif=b"Exif\x00\x00" + HOSTILE_EXIF)
    with pytest.raises(DecodeError, match=r"hostile\.png: malformed EXIF block: directory"):
        decode(source)


def test_encode_drops_an_unparseable_exif_block_knowingly(tmp_path, caplog):
    # Images built in code (not decoded) can still carry a bad block: encode logs and drops it.
    source = tmp_path / "clean.png"
    PILImage.fromarray(quadrants()).save(source)
    decoded = decode(source)
    hostile = decoded.replace(metadata=replace(decoded.metadata, exif=HOSTILE_EXIF))
    with caplog.at_level(logging.WARNING, logger="pipeline.image"):
        encode(hostile, tmp_path / "out.png")
    assert decode(tmp_path / "out.png").metadata.exif is None
    assert "EXIF block dropped" in caplog.text


def test_tiff_source_exif_carries_descriptive_tags_and_exif_ifd(tmp_path):
    source = tmp_path / "scan.tif"
    exif = piexif.dump(
        {
            "0th": {
                piexif.ImageIFD.Artist: b"A. Archivist",
                piexif.ImageIFD.Software: b"ScanStation",
            },
            "Exif": {piexif.ExifIFD.DateTimeOriginal: b"1921:05:04 10:00:00"},
        }
    )
    PILImage.fromarray(quadrants()).save(source, "TIFF", exif=exif)
    output = tmp_path / "out.jpg"

    encode(decode(source), output)

    carried = piexif.load(str(output))
    assert carried["0th"][piexif.ImageIFD.Artist] == b"A. Archivist"
    assert carried["0th"][piexif.ImageIFD.Software] == b"ScanStation"
    assert carried["Exif"][piexif.ExifIFD.DateTimeOriginal] == b"1921:05:04 10:00:00"
    # Image structure (strips, sample layout) of the TIFF is not EXIF and is not carried.
    assert piexif.ImageIFD.StripOffsets not in carried["0th"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_xmp_packet_is_carried(tmp_path, fmt):
    packet = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><dc:title>Harbour, 1921</dc:title></x:xmpmeta>'
    source = make_image(to_unit(quadrants(), 8), fmt=fmt, metadata=Metadata(xmp=packet))
    path = tmp_path / f"out{suffix_for(fmt)}"

    encode(source, path)

    assert decode(path).metadata.xmp == packet
    pillow = PILImage.open(path)
    independent = pillow.info.get("xmp") or pillow.info.get("XML:com.adobe.xmp")
    if fmt == "tiff":
        independent = tifffile.TiffFile(path).pages.first.tags[700].value
    assert packet in (independent.encode() if isinstance(independent, str) else independent)


def iptc_records(caption: bytes) -> bytes:
    return (
        b"\x1c\x02\x00\x00\x02\x00\x04"
        + b"\x1c\x02\x78"
        + struct.pack(">H", len(caption))
        + caption
    )


@pytest.mark.parametrize("fmt", ["jpeg", "tiff"])
def test_iptc_is_carried_where_the_format_holds_it(tmp_path, fmt):
    iptc = iptc_records(b"Dock workers, Hamburg")
    body = (
        b"Photoshop 3.0\x00" + b"8BIM" + struct.pack(">HHI", 0x0404, 0, len(iptc)) + iptc + b"\x00"
    )
    source = tmp_path / "iptc.jpg"
    PILImage.fromarray(quadrants()).save(
        source, extra=b"\xff\xed" + struct.pack(">H", len(body) + 2) + body
    )
    decoded = decode(source)
    path = tmp_path / f"out{suffix_for(fmt)}"

    encode(decoded, path, format=fmt)

    assert decoded.metadata.iptc == iptc
    assert decode(path).metadata.iptc == iptc
    if fmt == "jpeg":
        assert PILImage.open(path).info["photoshop"][0x0404] == iptc


def test_png_text_and_colour_chunks_are_carried_to_png(tmp_path):
    source = tmp_path / "annotated.png"
    with source.open("wb") as out:
        out.write(
            b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0))
        )
        out.write(png_chunk(b"gAMA", struct.pack(">I", 100000)))
        out.write(png_chunk(b"tEXt", b"Title\x00Harbour"))
        out.write(png_chunk(b"iTXt", b"Description\x00\x00\x00\x00\x00Hafen \xe2\x80\x93 1921"))
        out.write(png_chunk(b"IDAT", zlib.compress(b"\x00\x10\x20\x00\x30\x40")))
        out.write(png_chunk(b"IEND", b""))
    decoded = decode(source)

    encode(decoded, tmp_path / "out.png")
    carried = PILImage.open(tmp_path / "out.png")
    carried.load()

    assert decoded.metadata.text == (("Title", "Harbour"), ("Description", "Hafen \u2013 1921"))
    assert carried.text == {"Title": "Harbour", "Description": "Hafen \u2013 1921"}
    assert carried.info["gamma"] == pytest.approx(1.0)


def test_jpeg_comment_is_carried(tmp_path):
    source = tmp_path / "comment.jpg"
    PILImage.fromarray(quadrants()).save(source, comment=b"Plate 17, cracked lower left")

    encode(decode(source), tmp_path / "out.jpg")

    assert PILImage.open(tmp_path / "out.jpg").info["comment"] == b"Plate 17, cracked lower left"


def test_dpi_is_carried(tmp_path):
    for fmt in ("jpeg", "png", "tiff"):
        source = make_image(to_unit(quadrants(), 8), fmt=fmt, metadata=Metadata(dpi=(600.0, 600.0)))
        path = tmp_path / f"out{suffix_for(fmt)}"
        encode(source, path)
        assert decode(path).metadata.dpi == pytest.approx((600.0, 600.0), abs=0.01)


# --- refusing and rejecting -------------------------------------------------------------------


def crafted_png(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    tiny = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", tiny)
        + png_chunk(b"IEND", b"")
    )


def crafted_jpeg(width: int, height: int) -> bytes:
    sof = (
        b"\xff\xc0"
        + struct.pack(">HBHHB", 17, 8, height, width, 3)
        + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    )
    return b"\xff\xd8" + sof + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + bytes(32) + b"\xff\xd9"


def crafted_tiff(width: int, height: int) -> bytes:
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
    tags += [(273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, 16)]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", t, k, 1, v) for t, k, v in tags
    )
    return b"II*\x00" + struct.pack("<I", 24) + bytes(16) + ifd + bytes(4)


def crafted_webp(width: int, height: int) -> bytes:
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


@pytest.mark.parametrize(
    ("name", "data", "limit"),
    [
        ("bomb.png", crafted_png(100_000, 100_000), image_module.DEFAULT_MAX_PIXELS),
        ("bomb.jpg", crafted_jpeg(65000, 65000), image_module.DEFAULT_MAX_PIXELS),
        ("bomb.tif", crafted_tiff(200_000, 200_000), image_module.DEFAULT_MAX_PIXELS),
        ("bomb.webp", crafted_webp(16383, 16383), 100_000_000),
    ],
)
def test_huge_declared_dimensions_are_refused_before_decoding(tmp_path, name, data, limit):
    path = tmp_path / name
    path.write_bytes(data)

    with pytest.raises(ImageTooLargeError) as info:
        decode(path, max_pixels=limit)

    assert str(path) in str(info.value) and "limit" in str(info.value)


def test_pixel_limit_is_the_callers(tmp_path):
    path = tmp_path / "small.png"
    PILImage.fromarray(quadrants()).save(path)  # 48 x 32 = 1536 pixels
    with pytest.raises(ImageTooLargeError):
        decode(path, max_pixels=1535)
    assert decode(path, max_pixels=1536).width == 48


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file_raises_decode_error_naming_the_file(tmp_path, fmt):
    whole = tmp_path / f"whole{suffix_for(fmt)}"
    PILImage.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    cut = tmp_path / f"cut{suffix_for(fmt)}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])

    with pytest.raises(DecodeError) as info:
        decode(cut)

    assert str(cut) in str(info.value)
    assert not isinstance(info.value, UnsupportedImageError)


def test_corrupt_jpeg_scan_data_is_refused_not_returned_damaged(tmp_path):
    whole = tmp_path / "whole.jpg"
    PILImage.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole, quality=90)
    data = bytearray(whole.read_bytes())
    scan = data.index(b"\xff\xda")
    data[scan + 200 : scan + 204] = b"\xff\x9f\xff\x9f"  # not a marker that may appear there
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(bytes(data))

    with pytest.raises(DecodeError, match="damaged JPEG data"):
        decode(damaged)


def test_stray_bytes_between_jpeg_header_segments_refuse_the_file(tmp_path):
    clean = tmp_path / "clean.jpg"
    PILImage.fromarray(quadrants()).save(clean)
    data = clean.read_bytes()
    after_app0 = 4 + int.from_bytes(data[4:6], "big")
    stray = tmp_path / "stray.jpg"
    stray.write_bytes(data[:after_app0] + b"\x00junk" + data[after_app0:])
    with pytest.raises(DecodeError, match=r"stray\.jpg: damaged JPEG header: 5 stray bytes"):
        decode(stray)


def test_fill_bytes_before_a_jpeg_marker_are_legal(tmp_path):
    clean = tmp_path / "clean.jpg"
    PILImage.fromarray(quadrants()).save(clean)
    data = clean.read_bytes()
    after_app0 = 4 + int.from_bytes(data[4:6], "big")
    filled = tmp_path / "filled.jpg"
    filled.write_bytes(data[:after_app0] + b"\xff\xff\xff" + data[after_app0:])
    np.testing.assert_array_equal(decode(filled).pixels, decode(clean).pixels)


def test_png_image_data_after_the_compressed_stream_is_refused(tmp_path):
    clean = crafted_png(4, 2)
    iend = clean.rindex(b"IEND") - 4
    extra = zlib.compress(b"\x00" * 16)
    chunk = struct.pack(">I", len(extra)) + b"IDAT" + extra
    chunk += struct.pack(">I", zlib.crc32(b"IDAT" + extra))
    path = tmp_path / "surplus.png"
    path.write_bytes(clean[:iend] + chunk + clean[iend:])
    with pytest.raises(DecodeError, match="after the end of its compressed stream"):
        decode(path)


def test_png_with_a_bad_crc_is_refused(tmp_path):
    good = crafted_png(4, 2)
    bad = good[:40] + bytes([good[40] ^ 0xFF]) + good[41:]
    path = tmp_path / "badcrc.png"
    path.write_bytes(bad)
    with pytest.raises(DecodeError, match="CRC"):
        decode(path)


def test_empty_and_junk_files_are_decode_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
    with pytest.raises(DecodeError, match="empty"):
        decode(tmp_path / "empty.png")
    with pytest.raises(DecodeError, match="not a recognised image"):
        decode(tmp_path / "junk.jpg")


@pytest.mark.parametrize(
    ("save", "words"),
    [
        (lambda path: PILImage.fromarray(quadrants()).save(path, "GIF"), "GIF"),
        (lambda path: PILImage.fromarray(quadrants()).save(path, "BMP"), "BMP"),
        (lambda path: path.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16)), "HEIC"),
        (lambda path: PILImage.fromarray(quadrants()).convert("CMYK").save(path, "JPEG"), "CMYK"),
        (
            lambda path: tifffile.imwrite(path, np.zeros((4, 4, 3), np.float32), photometric="rgb"),
            "floating-point",
        ),
        (
            lambda path: tifffile.imwrite(
                path, np.zeros((4, 4, 4), np.uint8), photometric="separated"
            ),
            "CMYK",
        ),
        (lambda path: PILImage.fromarray(quadrants()[:, :, 0] > 100).save(path, "PNG"), "1-bit"),
    ],
    ids=["gif", "bmp", "heic", "cmyk-jpeg", "float-tiff", "cmyk-tiff", "bilevel-png"],
)
def test_unsupported_images_are_refused_with_the_reason(tmp_path, save, words):
    path = tmp_path / "refused.img"
    save(path)
    with pytest.raises(UnsupportedImageError) as info:
        decode(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_tiff_with_a_thumbnail_page_decodes_page_zero(tmp_path):
    path = tmp_path / "with_thumbnail.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(quadrants(), photometric="rgb")
        tif.write(quadrants(8, 12), photometric="rgb", subfiletype=1)  # reduced resolution

    assert decode(path).pixels.shape == (32, 48, 3)


def test_tiff_with_two_full_pages_is_refused(tmp_path):
    path = tmp_path / "two_pages.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(quadrants(), photometric="rgb")
        tif.write(quadrants(), photometric="rgb")

    with pytest.raises(UnsupportedImageError, match="multi-page"):
        decode(path)


def test_tiff_with_a_missing_strip_is_refused(tmp_path):
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, quadrants(), photometric="rgb", rowsperstrip=8)
    data = bytearray(path.read_bytes())
    page = tifffile.TiffFile(io.BytesIO(bytes(data))).pages.first
    counts = page.tags["StripByteCounts"]
    struct.pack_into("<I", data, counts.valueoffset + 4, 0)  # the second strip: no bytes
    path.write_bytes(bytes(data))

    with pytest.raises(DecodeError, match="missing"):
        decode(path)


# --- TIFF output ------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


def test_tiff_encode_streams_a_disk_backed_memmap_band_by_band(tmp_path):
    height, width = 6000, 4000  # 288 MB of float32 on disk
    backing = tmp_path / "pixels.f32"
    writer = np.memmap(backing, dtype=np.float32, mode="w+", shape=(height, width, 3))
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)
    for start in range(0, height, 500):
        writer[start : start + 500] = ramp[np.newaxis, :, np.newaxis]
    writer.flush()
    del writer
    pixels = np.memmap(backing, dtype=np.float32, mode="r", shape=(height, width, 3))
    source = make_image(np.zeros((1, 1, 3)), fmt="tiff").replace(pixels=pixels)

    peak, baseline, done = [0], rss_bytes(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            done.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        encode(source, tmp_path / "big.tif", bit_depth=8)
    finally:
        done.set()
        sampler.join()

    # A full-size converted copy (72 MB of uint8, 288 MB of float) or keeping the pages of the
    # memmap resident would pass this; one band at a time stays far below it.
    assert peak[0] - baseline < 120 * 2**20
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        page = tif.pages.first
        assert page.shape == (height, width, 3) and page.is_tiled
        rows = page.asarray()[::997]
    expected = np.rint(ramp * np.float32(255)).astype(np.uint8)  # clip, scale, round
    np.testing.assert_array_equal(rows, np.broadcast_to(expected[None, :, None], rows.shape))


def test_bigtiff_output_carries_exif_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(tiff_format, "CLASSIC_TIFF_LIMIT", 0)  # as if the image passed 4 GiB
    source = tmp_path / "camera.jpg"
    PILImage.fromarray(quadrants()).save(source, exif=camera_exif(1))
    output = tmp_path / "out.tif"

    encode(decode(source), output, format="tiff")

    with tifffile.TiffFile(output) as tif:
        assert tif.is_bigtiff
        assert tif.pages.first.tags["ExifTag"].value["DateTimeOriginal"] == "1921:05:04 10:00:00"
    assert decode(output).metadata.exif is not None
    assert imagecodecs.tiff_decode(output.read_bytes()).shape == (32, 48, 3)  # libtiff reads it
