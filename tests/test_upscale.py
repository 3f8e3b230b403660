"""The upscale stage: scale factors, greyscale, alpha, denoise interpolation, options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from modelfactory import tiny_compact, tiny_rrdbnet
from pydantic import ValidationError

from pipeline.image import Image, Metadata
from pipeline.models import ModelStore
from pipeline.stage import StageContext
from pipeline.stages.upscale import UpscaleOptions, UpscaleStage


def make_image(height=40, width=56, channels=3, alpha=False, bit_depth=8, seed=0) -> Image:
    rng = np.random.default_rng(seed)
    pixels = rng.random((height, width, channels), dtype=np.float32)
    mask = rng.random((height, width), dtype=np.float32) if alpha else None
    return Image(pixels=pixels, alpha=mask, bit_depth=bit_depth, format="png", metadata=Metadata())


@pytest.fixture
def ctx(tmp_path) -> StageContext:
    return StageContext(models=ModelStore(tmp_path / "cache"), device="cpu", precision="fp32")


def stage(**options) -> UpscaleStage:
    return UpscaleStage(UpscaleOptions(**options))


@pytest.mark.parametrize(
    ("scale", "size"),
    [(4, (224, 160)), (2, (112, 80)), (3, (168, 120)), (8, (448, 320)), (2.5, (140, 100))],
)
def test_output_has_the_requested_scale_whatever_the_native_scale(tmp_path, ctx, scale, size):
    model = tiny_compact(tmp_path / "x4.pth", scale=4)
    result = stage(model=str(model), scale=scale, tile=32, overlap=8).run(make_image(), ctx)
    assert (result.image.width, result.image.height) == size
    assert result.image.pixels.dtype == np.float32
    assert result.image.pixels.min() >= 0.0 and result.image.pixels.max() <= 1.0
    assert result.params["native_scale"] == 4
    assert result.params["resample"] == {4: None, 8: "lanczos4"}.get(scale, "area")


def test_params_name_the_model_and_its_hash_and_are_json(tmp_path, ctx):
    from pipeline.files import sha256_file

    model = tiny_rrdbnet(tmp_path / "x2.pth", scale=2)
    result = stage(model=str(model), scale=2, tile=0).run(make_image(), ctx)
    params = json.loads(json.dumps(result.params))
    assert params["model_sha256"] == sha256_file(model)
    assert params["architecture"] == "ESRGAN"
    assert params["precision"] == "fp32" and params["device"] == "cpu"
    assert params["tile"] == 0


def test_greyscale_stays_single_channel_and_bit_depth_is_kept(tmp_path, ctx):
    model = tiny_compact(tmp_path / "x4.pth")
    grey = make_image(channels=1, bit_depth=16)
    result = stage(model=str(model), scale=2, tile=0).run(grey, ctx)
    assert result.image.pixels.shape == (80, 112, 1)
    assert result.image.bit_depth == 16
    assert result.params["greyscale_via_rgb"] is True


def test_alpha_is_resized_separately_to_the_output_size(tmp_path, ctx):
    model = tiny_compact(tmp_path / "x4.pth")
    result = stage(model=str(model), scale=2, tile=0).run(make_image(alpha=True), ctx)
    assert result.image.alpha.shape == (80, 112)
    assert result.params["alpha"] == "bilinear"


def test_input_image_is_not_modified(tmp_path, ctx):
    model = tiny_compact(tmp_path / "x4.pth")
    image = make_image(alpha=True)
    before = image.pixels.copy(), image.alpha.copy()
    stage(model=str(model), scale=4, tile=32, overlap=8).run(image, ctx)
    np.testing.assert_array_equal(image.pixels, before[0])
    np.testing.assert_array_equal(image.alpha, before[1])


def test_denoise_strength_interpolates_the_two_models_weights(tmp_path, ctx):
    strong = tiny_compact(tmp_path / "general.pth", seed=1)
    weak = tiny_compact(tmp_path / "wdn.pth", seed=2)
    image = make_image()

    def run(**options):
        return stage(scale=4, tile=0, **options).run(image, ctx)

    plain_strong = run(model=str(strong)).image.pixels
    plain_weak = run(model=str(weak)).image.pixels
    at_one = run(model=str(strong), denoise_model=str(weak), denoise_strength=1.0)
    at_zero = run(model=str(strong), denoise_model=str(weak), denoise_strength=0.0)
    np.testing.assert_allclose(at_one.image.pixels, plain_strong, atol=1e-6)
    np.testing.assert_allclose(at_zero.image.pixels, plain_weak, atol=1e-6)

    half = run(model=str(strong), denoise_model=str(weak), denoise_strength=0.5)
    sd_a = torch.load(strong, weights_only=True)["params"]
    sd_b = torch.load(weak, weights_only=True)["params"]
    blended = tmp_path / "blend.pth"
    torch.save({"params": {k: 0.5 * sd_a[k] + 0.5 * sd_b[k] for k in sd_a}}, blended)
    np.testing.assert_allclose(half.image.pixels, run(model=str(blended)).image.pixels, atol=1e-6)
    assert half.params["denoise_strength"] == 0.5
    assert half.params["denoise_model_sha256"] != half.params["model_sha256"]


def test_a_restoration_model_is_refused_as_an_upscaler(tmp_path, ctx):
    from modelfactory import tiny_dncnn

    from pipeline.errors import StageError

    model = tiny_dncnn(tmp_path / "dncnn.pth")
    with pytest.raises(StageError, match="not a super-resolution model"):
        stage(model=str(model)).run(make_image(), ctx)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale": 9}, "less than or equal to 8"),
        ({"scale": 0}, "greater than 0"),
        ({"tile": 16}, "tile: must be 0"),
        ({"tile": 64, "overlap": 65}, "overlap: must not exceed the tile"),
        ({"denoise_strength": 0.5}, "only for realesr-general-x4v3"),
        ({"precision": "int8"}, "Input should be"),
        ({"colour": True}, "Extra inputs"),
    ],
)
def test_invalid_options_are_rejected(options, message):
    with pytest.raises(ValidationError, match=message):
        UpscaleOptions(**options)


def test_denoise_strength_is_accepted_for_the_general_model():
    options = UpscaleOptions(model="realesr-general-x4v3", denoise_strength=0.3)
    assert options.denoise_strength == 0.3


def test_greyscale_conversion_of_a_disk_backed_output_matches_luma(tmp_path):
    from pipeline.tiling import TileSettings, luma

    rgb = np.random.default_rng(3).random((600, 50, 3), dtype=np.float32)
    grey = luma(rgb, TileSettings(max_bytes_in_ram=1024, scratch_dir=tmp_path))
    assert isinstance(grey, np.memmap) and grey.shape == (600, 50, 1)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(grey[..., 0], expected, atol=1e-6)
