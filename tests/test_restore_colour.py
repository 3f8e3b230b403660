"""The restore stage's colour evidence on real photographs: levels need dye-fade evidence
(monochrome and toned prints with lifted blacks and a dim white keep their contrast, while the
same fade on a colour print is corrected), and "darks" are dark in brightness (a saturated
bright sky, whose red channel sits low, is not read as faded)."""

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


def test_the_same_fade_on_a_colour_print_is_still_corrected(ctx, city100):
    """Lifted blacks and a dimmed white (0.3 + 0.55 x) on the colour frames: levels act and the
    error against the unfaded frame at least halves (001H, mostly bright, is refused as
    high-key, as it was before); the monochrome copy of the same fade is left."""
    corrected = 0
    for name, rgb in city100.items():
        faded = (0.3 + 0.55 * rgb).astype(np.float32)
        result = colour_part(faded, ctx)
        colour = result.params["colour"]
        if colour["levels"] == 0.0:
            assert colour["levels_refused"] == ["high-key"], name
        else:
            assert colour["levels"] == 1.0, name
            mse_before = np.mean((faded - rgb) ** 2)
            assert np.mean((result.image.pixels - rgb) ** 2) < 0.5 * mse_before, name
            corrected += 1
        grey = monochrome_versions(faded)["neutral"]
        assert colour_part(grey, ctx).image.pixels is grey, name
    assert corrected >= len(city100) - 1


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
