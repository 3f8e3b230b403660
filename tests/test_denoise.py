"""The denoise stage: non-local means, DnCNN (tiny and real), strength blending, depth kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CORPUS, shared_file
from modelfactory import tiny_compact, tiny_dncnn
from pydantic import ValidationError

from pipeline.errors import StageError
from pipeline.image import Image, Metadata, decode
from pipeline.models import ModelStore
from pipeline.stage import StageContext
from pipeline.stages.denoise import DenoiseOptions, DenoiseStage


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / np.mean((a - b) ** 2)))


def noisy_pair(channels=3, bit_depth=8, seed=0) -> tuple[Image, np.ndarray]:
    """A smooth image and the same with Gaussian noise (sigma 10 levels), quantised."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.random((12, 12, channels)).astype(np.float32)
    clean = cv2.resize(coarse, (96, 96), interpolation=cv2.INTER_CUBIC).reshape(96, 96, -1)
    clean = np.clip(clean, 0, 1)
    levels = 65535 if bit_depth == 16 else 255
    noisy = np.rint(np.clip(clean + rng.normal(0, 10 / 255, clean.shape), 0, 1) * levels)
    image = Image(
        pixels=(noisy / levels).astype(np.float32),
        alpha=None,
        bit_depth=bit_depth,
        format="png",
        metadata=Metadata(),
    )
    return image, clean


@pytest.fixture
def ctx(tmp_path) -> StageContext:
    return StageContext(models=ModelStore(tmp_path / "cache"), device="cpu", precision="fp32")


@pytest.mark.parametrize(("channels", "bit_depth"), [(3, 8), (1, 8), (3, 16), (1, 16)])
def test_nlm_reduces_noise_and_keeps_shape_depth_and_channels(ctx, channels, bit_depth):
    image, clean = noisy_pair(channels, bit_depth)
    result = DenoiseStage(DenoiseOptions(method="nlm", h=20)).run(image, ctx)
    assert result.image.pixels.shape == image.pixels.shape
    assert result.image.pixels.dtype == np.float32
    assert result.image.bit_depth == bit_depth
    assert psnr(result.image.pixels, clean) > psnr(image.pixels, clean) + 2


def test_nlm_on_16_bit_is_not_quantised_to_8_bits(ctx):
    image, _ = noisy_pair(3, 16)
    out = DenoiseStage(DenoiseOptions(method="nlm", h=20)).run(image, ctx).image.pixels
    levels = np.unique(np.rint(out * 65535) % 257)
    assert len(levels) > 10  # 8-bit values would all be multiples of 257


@pytest.mark.parametrize("strength", [0.0, 0.3])
def test_strength_blends_the_denoised_image_with_the_input(ctx, strength):
    image, _ = noisy_pair()
    full = DenoiseStage(DenoiseOptions(method="nlm")).run(image, ctx).image.pixels
    part = DenoiseStage(DenoiseOptions(method="nlm", strength=strength)).run(image, ctx)
    expected = strength * full + (1 - strength) * image.pixels
    np.testing.assert_allclose(part.image.pixels, expected, atol=1e-6)
    assert part.params["strength"] == strength


def test_dncnn_runs_a_colour_model_tiled_and_records_its_hash(tmp_path, ctx):
    from pipeline.files import sha256_file

    weights = tiny_dncnn(tmp_path / "dncnn.pth", channels=3)
    image, _ = noisy_pair()
    stage = DenoiseStage(DenoiseOptions(method="dncnn", model=str(weights), tile=48))
    result = stage.run(image, ctx)
    whole = DenoiseStage(DenoiseOptions(method="dncnn", model=str(weights), tile=0))
    np.testing.assert_allclose(result.image.pixels, whole.run(image, ctx).image.pixels, atol=2e-5)
    params = json.loads(json.dumps(result.params))
    assert params["model_sha256"] == sha256_file(weights)
    assert params["architecture"] == "DnCNN" and params["method"] == "dncnn"


def test_dncnn_picks_the_grey_model_for_greyscale_images(tmp_path, ctx):
    colour = tiny_dncnn(tmp_path / "colour.pth", channels=3)
    grey = tiny_dncnn(tmp_path / "grey.pth", channels=1, seed=3)
    stage = DenoiseStage(DenoiseOptions(method="dncnn", model=str(colour), grey_model=str(grey)))
    grey_image, _ = noisy_pair(channels=1)
    result = stage.run(grey_image, ctx)
    assert result.image.pixels.shape == (96, 96, 1)
    assert result.params["greyscale_via_rgb"] is False
    assert result.params["model"].endswith("grey.pth")
    colour_result = stage.run(noisy_pair()[0], ctx)
    assert colour_result.params["model"].endswith("colour.pth")


def test_dncnn_without_a_grey_model_runs_grey_through_the_colour_model(tmp_path, ctx):
    colour = tiny_dncnn(tmp_path / "colour.pth", channels=3)
    grey_image, _ = noisy_pair(channels=1)
    result = DenoiseStage(DenoiseOptions(method="dncnn", model=str(colour))).run(grey_image, ctx)
    assert result.image.pixels.shape == (96, 96, 1)
    assert result.params["greyscale_via_rgb"] is True


def test_an_upscaler_is_refused_as_a_denoiser(tmp_path, ctx):
    weights = tiny_compact(tmp_path / "x4.pth")
    with pytest.raises(StageError, match="not a 1x restoration model"):
        DenoiseStage(DenoiseOptions(method="model", model=str(weights))).run(noisy_pair()[0], ctx)


def test_input_image_is_not_modified(ctx):
    image, _ = noisy_pair()
    before = image.pixels.copy()
    DenoiseStage(DenoiseOptions(method="nlm")).run(image, ctx)
    np.testing.assert_array_equal(image.pixels, before)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "model"}, "model: required"),
        ({"method": "nlm", "model": "x"}, "nlm uses no weights"),
        ({"strength": 1.5}, "less than or equal to 1"),
        ({"method": "bm3d"}, "Input should be"),
        ({"tile": 8}, "tile: must be 0"),
    ],
)
def test_invalid_options_are_rejected(options, message):
    with pytest.raises(ValidationError, match=message):
        DenoiseOptions(**options)


def test_real_dncnn_improves_psnr_on_real_noisy_photos(ctx):
    """PolyU real high-ISO pairs with the real KAIR colour-blind weights."""
    weights = shared_file("weights/dncnn_color_blind.pth")
    pairs = sorted((CORPUS / "real_lr_hr_pairs/PolyU_real_noise").glob("*_real.JPG"))[:2]
    assert len(pairs) == 2, "PolyU_real_noise has fewer than two *_real.JPG photos"
    stage = DenoiseStage(DenoiseOptions(method="dncnn", model=str(weights)))
    for noisy_path in pairs:
        noisy = decode(noisy_path)
        clean = decode(noisy_path.with_name(noisy_path.name.replace("_real.", "_mean.")))
        out = stage.run(noisy, ctx).image.pixels
        assert psnr(out, clean.pixels) > psnr(noisy.pixels, clean.pixels), noisy_path.name
