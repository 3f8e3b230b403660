"""pipeline.image against every file of ../shared/corpus/metadata_edge_cases and hostile_inputs.

Each edge case is decoded (or refused, if it is listed below as refused), checked against Pillow
as an independent oracle for upright pixels, upscaled 2x as a stage would, encoded to its own
format and decoded again: metadata, depth, channels and orientation must survive. Each hostile
file must end as one of our DecodeErrors (or decode, where listed as intact), within bounds.
"""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import piexif
import pytest
from PIL import Image as PILImage
from PIL import ImageOps

from pipeline.errors import DecodeError, UnsupportedImageError
from pipeline.image import Image, decode, encode, suffix_for

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = SHARED / "corpus"
EDGE_CASES = CORPUS / "metadata_edge_cases"
HOSTILE = CORPUS / "hostile_inputs"

pytestmark = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"{SHARED} is absent, so the shared test corpus cannot be read"
)

# Valid files we refuse rather than decode wrongly, with words the refusal must contain. A file
# not listed must decode: a regression that starts refusing a good file fails.
REFUSED = {
    "danbooru_test-cmyk-no-profile.jpg": "CMYK",
    "exifsamples_iphone_13_pro_max.HEIC": "HEIC",
    "libjpegturbo_monkey12.jpg": "12-bit JPEG",
    "pillow_12bit.cropped.tif": "12-bit",
    "pillow_hopper.Lab.tif": "L*a*b*",
    "pillow_hopper_g4.tif": "1-bit bilevel",
    "pillow_multipage.tiff": "multi-page",
    "pillow_pil_sample_cmyk.jpg": "CMYK",
    "skimage_multipage_rgb.tif": "multi-page",
}

# Hostile files whose pixels decode but whose structure is damaged (stray bytes between JPEG
# segments, an unparsable EXIF block, image data past the end of the PNG stream): refused too,
# each with the reason, since the metadata around the damage cannot be trusted.
DAMAGED_STRUCTURE = {
    "pillow_hopper_idat_after_image_end.png": "after the end of its compressed stream",
    "pillow_invalid-exif.jpg": "malformed EXIF block",
    "pillow_junk_jpeg_header.jpg": "stray bytes before marker",
    "pillow_truncated_app14.jpg": "stray bytes before marker",
}

# EXIF tags whose values an encode changes on purpose, per IFD (piexif's names for the IFDs).
CHANGED_TAGS = {
    "0th": {256, 257, 274, 34665, 34853},  # sizes, Orientation, sub-IFD pointers (relocated)
    "Exif": {0xA002, 0xA003, 40965},  # PixelX/YDimension, Interop pointer
    "GPS": set(),
    "Interop": set(),
}
# A TIFF's resolution is rewritten from Metadata.dpi (compared on its own below).
CHANGED_IN_TIFF = {282, 283, 296}

XMP_FIELDS = rb"(tiff:Orientation|tiff:Image(?:Width|Length)|exif:Pixel[XY]Dimension)"


def corpus_files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def names(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


EDGE_FILES = corpus_files(EDGE_CASES)
DECODABLE = [path for path in EDGE_FILES if path.name not in REFUSED]
HOSTILE_FILES = corpus_files(HOSTILE)


def test_the_corpus_has_decodable_edge_cases_and_hostile_inputs():
    # The tests below are parametrised over these lists: empty, they would pass having run none.
    assert DECODABLE, f"no decodable file in {EDGE_CASES}"
    assert len(HOSTILE_FILES) > len(DAMAGED_STRUCTURE), f"no hostile file in {HOSTILE}"


def test_refusal_list_names_real_files():
    present = set(names(EDGE_FILES)) | set(names(HOSTILE_FILES))
    assert present.issuperset(REFUSED)
    assert present.issuperset(DAMAGED_STRUCTURE)


@pytest.mark.parametrize("path", EDGE_FILES, ids=names(EDGE_FILES))
def test_edge_case_decodes_or_is_refused_with_its_reason(path):
    if path.name in REFUSED:
        with pytest.raises(UnsupportedImageError) as info:
            decode(path)
        assert path.name in str(info.value)
        assert REFUSED[path.name] in str(info.value)
    else:
        decoded = decode(path)
        assert decoded.pixels.dtype == np.float32 and decoded.channels in (1, 3)
        assert decoded.pixels.min() >= 0.0 and decoded.pixels.max() <= 1.0


def pillow_reference(path: Path, decoded: Image) -> tuple[np.ndarray, float]:
    """Pillow's upright decode in [0, 1] (colour, then alpha if any) and the tolerance to use.

    Pillow reduces 16-bit colour to 8 bits by truncation, so 16-bit files compare to 1/255.
    """
    with PILImage.open(path) as opened:
        upright = ImageOps.exif_transpose(opened)
    if upright.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(upright, dtype=np.float32)[:, :, None] / 65535, 1e-6
    mode = {1: "L", 3: "RGB"}[decoded.channels] + ("A" if decoded.alpha is not None else "")
    reference = np.asarray(upright.convert(mode), dtype=np.float32) / 255
    tolerance = 1.01 / 255 if decoded.bit_depth == 16 else 1e-6
    return reference.reshape(*reference.shape[:2], -1), tolerance


@pytest.mark.parametrize("path", DECODABLE, ids=names(DECODABLE))
def test_edge_case_is_upright_and_matches_pillow(path):
    decoded = decode(path)
    reference, tolerance = pillow_reference(path, decoded)
    ours = decoded.pixels
    if decoded.alpha is not None:
        ours = np.dstack([ours, decoded.alpha])
        # Colour under (near-)transparent pixels is not defined for premultiplied sources, and
        # Pillow un-premultiplies after cutting 16-bit samples to 8 bits (we do it in float).
        visible = decoded.alpha > 0.5
        ours, reference = ours[visible], reference[visible]
        tolerance = max(tolerance, (3.01 if decoded.bit_depth == 16 else 2.01) / 255)

    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= tolerance


def upscaled(image: Image) -> Image:
    """Simulate a stage that changes the size: 2x bilinear, metadata untouched."""
    size = (image.width * 2, image.height * 2)
    pixels = cv2.resize(image.pixels, size, interpolation=cv2.INTER_LINEAR)
    alpha = None if image.alpha is None else cv2.resize(image.alpha, size)
    return image.replace(pixels=pixels.reshape(size[1], size[0], -1), alpha=alpha)


def exif_dict(block: bytes | None) -> dict | None:
    return None if block is None else piexif.load(b"Exif\x00\x00" + block)


def assert_exif_kept(source: Image, output: Image) -> None:
    # piexif is the oracle: a source block it cannot read fails here rather than going
    # unchecked (our decoder refuses a malformed block, see DAMAGED_STRUCTURE).
    before = exif_dict(source.metadata.exif)
    after = exif_dict(output.metadata.exif)
    if before is None:
        return
    assert after is not None, "EXIF was lost"
    assert after["0th"].get(274, 1) == 1
    assert after["1st"] == {} and after["thumbnail"] is None
    if 0xA002 in before["Exif"]:
        assert after["Exif"][0xA002] == output.width
        assert after["Exif"][0xA003] == output.height
    for ifd, changed in CHANGED_TAGS.items():
        if output.format == "tiff" and ifd == "0th":
            changed = changed | CHANGED_IN_TIFF
        for tag, value in before[ifd].items():
            if tag not in changed:
                assert after[ifd].get(tag) == value, f"EXIF {ifd} tag {tag} changed"


def without_patched_xmp_fields(xmp: bytes) -> bytes:
    return re.sub(XMP_FIELDS + rb"(\s*=\s*[\"']|>)\s*\d+", rb"\1\2#", xmp)


@pytest.mark.parametrize("path", DECODABLE, ids=names(DECODABLE))
def test_edge_case_round_trip_keeps_what_matters(path, tmp_path):
    source = decode(path)
    changed = upscaled(source)
    output_path = tmp_path / f"out{suffix_for(source.format)}"

    assert encode(changed, output_path) == source.format
    output = decode(output_path)

    assert output.format == source.format
    assert output.metadata.icc_profile == source.metadata.icc_profile
    assert_exif_kept(source, output)
    if source.format in ("png", "tiff"):
        assert output.bit_depth == source.bit_depth
    assert output.channels == source.channels
    assert (output.alpha is None) == (source.alpha is None)
    assert output.metadata.orientation == 1
    # Upright: the output's pixels are the upscaled upright input (lossy formats within noise).
    assert output.pixels.shape == changed.pixels.shape
    error = np.abs(output.pixels - changed.pixels)
    if source.format in ("png", "tiff"):
        assert error.max() <= 0.5 / (65535 if output.bit_depth == 16 else 255) + 1e-6
    else:
        assert error.mean() < 0.02
    assert_side_metadata_kept(source, output)


def assert_side_metadata_kept(source: Image, output: Image) -> None:
    before, after = source.metadata, output.metadata
    if before.xmp:
        assert after.xmp is not None
        assert without_patched_xmp_fields(after.xmp) == without_patched_xmp_fields(before.xmp)
        assert b'tiff:Orientation="6"' not in after.xmp
    if source.format in ("jpeg", "tiff"):
        assert after.iptc == before.iptc
    if before.dpi and source.format != "webp":
        assert after.dpi == pytest.approx(before.dpi, abs=0.5)  # JFIF stores whole dpi
    if source.format == "png":
        assert [key for key, _ in after.text] == [key for key, _ in before.text]
        assert after.png_colour == before.png_colour


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", HOSTILE_FILES, ids=names(HOSTILE_FILES))
def test_hostile_input_ends_as_a_decode_error_within_bounds(path, tmp_path):
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as info:
            decode(path)
        assert path.name in str(info.value)
        assert DAMAGED_STRUCTURE.get(path.name, "") in str(info.value)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 2**20, f"decoding {path.name} allocated {peak >> 20} MiB"
