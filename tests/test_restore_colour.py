"""The restore stage's colour evidence on real photographs: white balance and levels need
dye-fade evidence, blacks that part (monochrome and toned prints with lifted blacks and a dim
white keep their contrast, a sunset or a dust haze over deep neutral blacks keeps its colour,
while a dye fade on a colour print is corrected), and "darks" are dark in brightness (a
saturated bright sky, whose red channel sits low, is not read as faded)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import shared_file

from pipeline.image import Image, Metadata, decode
from pipeline.models import ModelStore
from pipeline.stage import StageContext
from pipeline.stages.restore import RestoreOptions, RestoreStage

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
SEPIA = np.array([0.11, 0.0, -0.11], np.float32)
CITY100 = "corpus/real_lr_hr_pairs/City100_NikonD5500"
LEFT, PAPER = np.array([0.55, 0.75, 0.9], np.float32), np.array([1, 0.95, 0.82], np.float32)


def dye_faded(rgb: np.ndarray) -> np.ndarray:
    """Dye density left 0.55 / 0.75 / 0.9 (cyan fades first) on a yellowed paper base."""
    return ((1 - LEFT * (1 - rgb)) * PAPER).astype(np.float32)


def delta_e(a: np.ndarray, b: np.ndarray) -> float:
    la, lb = (cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2Lab) for x in (a, b))
    return float(np.mean(np.linalg.norm(la - lb, axis=2)))


@pytest.fixture
def ctx(tmp_path) -> StageContext:
    return StageContext(models=ModelStore(tmp_path / "cache"), device="cpu", precision="fp32")


def colour_part(pixels: np.ndarray, ctx: StageContext):
    image = Image(pixels=pixels, alpha=None, bit_depth=8, format="png", metadata=Metadata())
    return RestoreStage(RestoreOptions(dust=False)).run(image, ctx)


def fit(pixels: np.ndarray, side: int = 384) -> np.ndarray:
    height, width = pixels.shape[:2]
    scale = side / max(height, width)
    size = (round(width * scale), round(height * scale))
    return np.ascontiguousarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA))


@pytest.fixture(scope="module")
def city100() -> dict[str, np.ndarray]:
    """Every City100 H frame (camera captures of prints: lifted blacks, dim whites), reduced."""
    folder = shared_file(CITY100)
    frames = {path.stem: fit(decode(path).pixels) for path in sorted(folder.glob("*H.PNG"))}
    assert len(frames) >= 10, f"expected the ten City100 H frames under {folder}"
    return frames


def monochrome_versions(rgb: np.ndarray) -> dict[str, np.ndarray]:
    y = (rgb @ LUMA)[:, :, None]
    return {
        "greyscale": np.ascontiguousarray(y),
        "neutral": np.repeat(y, 3, axis=2),
        "sepia": np.clip(y + SEPIA * 4 * y * (1 - y), 0, 1).astype(np.float32),
    }


def test_monochrome_prints_with_lifted_blacks_and_a_dim_white_keep_their_contrast(ctx, city100):
    """The percentile rule asks to stretch several of these (fade past its threshold); none
    carries dye-fade evidence, so every one comes back bit-identical, with the reason."""
    asked = 0
    for name, rgb in city100.items():
        for kind, pixels in monochrome_versions(rgb).items():
            result = colour_part(pixels, ctx)
            colour = result.params["colour"]
            assert colour["levels"] == 0.0 and colour["white_balance"] == 0.0, (name, kind)
            assert result.image.pixels is pixels, (name, kind)
            if colour["fade"] > 0.25:
                asked += 1
                assert "monochrome: no dye-fade evidence" in colour["levels_refused"]
    assert asked >= 3  # the harmful case is real: 071H, 021H and 031H at least


def test_colour_captures_of_prints_with_a_mild_fade_and_no_cast_are_left(ctx, city100):
    """The colour frames themselves: 071H's blacks sit at 0.15 and its white at 0.88, a short
    range whose blacks do not part (as a soft print or a hazy scene looks); none is stretched."""
    asked = []
    for name, rgb in city100.items():
        result = colour_part(rgb, ctx)
        assert result.image.pixels is rgb, name
        refused = result.params["colour"].get("levels_refused", [])
        if any(doubt.startswith("no dye-fade evidence") for doubt in refused):
            asked.append(name)
    assert "071H" in asked


def test_a_neutral_fade_on_a_colour_print_is_left_and_a_dye_fade_corrected(ctx, city100):
    """Lifted blacks and a dimmed white the same in every channel (0.3 + 0.55 x) carry no dye's
    colour: left, with the reason. Dyes at 55 / 75 / 90 % on paper dimmed to 0.85 part the
    blacks and shorten the range: levels and white balance act together and the colour error
    against the unfaded frame falls by a fifth or more (011H, 041H, 061H: by half), or the
    stage says why it left the frame (the frames whose own range is short: balance gains
    above 2, or darks, mid-tones and lights that disagree)."""
    corrected = 0
    for name, rgb in city100.items():
        neutral = (0.3 + 0.55 * rgb).astype(np.float32)
        result = colour_part(neutral, ctx)
        assert result.image.pixels is neutral, name
        if result.params["colour"]["fade"] > 0.25:
            assert any(
                doubt.startswith("no dye-fade evidence")
                for doubt in result.params["colour"]["levels_refused"]
            ), name
        faded = (0.85 * (1 - LEFT * (1 - rgb))).astype(np.float32)
        result = colour_part(faded, ctx)
        colour = result.params["colour"]
        if result.image.pixels is faded:
            assert colour.get("white_balance_refused") or colour.get("refused"), name
            continue
        assert colour["levels"] > 0.8 and colour["white_balance"] > 0.8, name
        assert delta_e(result.image.pixels, rgb) < 0.8 * delta_e(faded, rgb), name
        corrected += 1
    assert corrected >= 5


def saturated(rgb: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * 1.6, 0, 1)
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1).astype(np.float32)


def test_a_saturated_bright_sky_is_not_read_as_faded(ctx):
    """City100 091H's top-left 256 px (sky), saturated: its red channel's black point (0.43) and
    its blue white (0.92) look like a faded print's range, but nothing in it is dark."""
    frame = decode(shared_file(f"{CITY100}/091H.PNG")).pixels
    sky = saturated(np.ascontiguousarray(frame[:256, :256]))
    result = colour_part(sky, ctx)
    colour = result.params["colour"]
    assert 0.15 <= min(colour["black"]) <= 0.45 and colour["fade"] > 0.35  # reads as faded
    assert colour["evidence"]["dark"] > 0.45
    assert "no dark tones" in colour["levels_refused"]
    assert result.image.pixels is sky


def test_dye_faded_city100_frames_are_corrected_or_left_never_made_worse(ctx, city100):
    """Most frames are corrected (colour error against the unfaded frame at least halves);
    the rest, where darks, mid-tones and lights disagree about the cast, are left as they are."""
    corrected = 0
    for name, rgb in city100.items():
        faded = dye_faded(rgb)
        result = colour_part(faded, ctx)
        before, after = delta_e(faded, rgb), delta_e(result.image.pixels, rgb)
        if result.image.pixels is faded:
            assert result.params["colour"]["white_balance_refused"], name
            continue
        assert after < 0.5 * before, name
        corrected += 1
    assert corrected >= 7  # 001H (agreement 0.48) among them


@pytest.mark.parametrize(("frame", "top", "left"), [("011H", 384, 384), ("091H", 384, 0)])
def test_a_fade_with_a_cast_that_cannot_be_confirmed_is_not_stretched_halfway(
    ctx, frame, top, left
):
    """Dye-faded 256 px crops whose white balance is refused (a gain above 2): levels alone
    on channels that part for an unknown reason raised their colour error by 9 to 22 delta E;
    now the stage leaves them as they are and says why."""
    crop = decode(shared_file(f"{CITY100}/{frame}.PNG")).pixels[top : top + 256, left : left + 256]
    faded = dye_faded(np.ascontiguousarray(crop))
    result = colour_part(faded, ctx)
    colour = result.params["colour"]
    assert colour["cast"] > 0.3 and colour["fade"] > 0.25  # the rule asks for both
    assert colour["white_balance_refused"]
    assert any(doubt.startswith("no dye-fade evidence") for doubt in colour["levels_refused"])
    assert result.image.pixels is faded


@pytest.mark.parametrize(
    ("relative", "top", "left"),
    [
        (f"{CITY100}/051H.PNG", 0, 384),  # a sunset sky over the sea
        (f"{CITY100}/061H.PNG", 384, 768),  # an orange townscape in evening light
        ("corpus/metadata_edge_cases/exifsamples_long_description.jpg", None, None),  # dust haze
    ],
)
def test_a_clean_photo_in_coloured_light_is_not_white_balanced(ctx, relative, top, left):
    """Real clean scenes whose whites are strongly coloured (the percentile rule asks for full
    white balance: the sunset and the haze came out grey, 23 and 17 dB from the input) but
    whose blacks stay together: coloured light, not a fading dye. Left bit-identical."""
    pixels = decode(shared_file(relative)).pixels
    if top is None:
        pixels = fit(pixels)
    else:
        pixels = np.ascontiguousarray(pixels[top : top + 256, left : left + 256])
    result = colour_part(pixels, ctx)
    colour = result.params["colour"]
    assert colour["cast"] > 0.35  # the rule asks for white balance
    assert "neutral blacks: no dye-fade evidence" in colour["white_balance_refused"]
    assert result.image.pixels is pixels
