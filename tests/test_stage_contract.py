"""One contract for every registered stage: shape and dtype, input untouched, JSON params,
deterministic output, 16-bit and greyscale preserved. A new stage must add a factory here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from modelfactory import (
    random_defectunet,
    random_restoreformer,
    random_retinaface,
    tiny_compact,
    tiny_dncnn,
)

from pipeline.image import Image, Metadata
from pipeline.models import ModelStore
from pipeline.stage import Stage, StageContext
from pipeline.stages import STAGES
from pipeline.stages.denoise import DenoiseOptions, DenoiseStage
from pipeline.stages.face import FaceOptions, FaceStage
from pipeline.stages.restore import RestoreOptions, RestoreStage
from pipeline.stages.upscale import UpscaleOptions, UpscaleStage

# Each factory builds a stage that needs no download: tiny models of the real architectures.
FACTORIES: dict[str, list[Callable[[Path], Stage]]] = {
    "denoise": [
        lambda tmp: DenoiseStage(DenoiseOptions(method="nlm")),
        lambda tmp: DenoiseStage(
            DenoiseOptions(
                method="dncnn", model=str(tiny_dncnn(tmp / "d.pth")), strength=0.5, tile=32
            )
        ),
    ],
    # A random detector at confidence 0 reports faces even in noise: one is restored and pasted.
    "face": [
        lambda tmp: FaceStage(
            FaceOptions(
                model=str(random_restoreformer(tmp / "rf.pth")),
                detector=str(random_retinaface(tmp / "det.pth")),
                parser=None,
                confidence=0.0,
                min_face_px=0,
                max_faces=1,
            )
        ),
    ],
    # Defaults (colour and dust: noise has neither a cast nor defects), and an artefact model.
    "restore": [
        lambda tmp: RestoreStage(RestoreOptions()),
        lambda tmp: RestoreStage(
            RestoreOptions(artefact_model=str(tiny_dncnn(tmp / "r.pth")), tile=32, sensitivity=1)
        ),
        # The learned dust detector (a random DefectUNet cut low so it marks pixels), tiled.
        lambda tmp: RestoreStage(
            RestoreOptions(
                detector="learned",
                detector_model=str(random_defectunet(tmp / "d.safetensors")),
                threshold=0.05,
                tile=32,
            )
        ),
    ],
    "upscale": [
        lambda tmp: UpscaleStage(
            UpscaleOptions(model=str(tiny_compact(tmp / "u.pth")), scale=2, tile=32)
        ),
    ],
}

CASES = [(kind, index) for kind, built in sorted(FACTORIES.items()) for index in range(len(built))]


def test_every_registered_stage_has_a_contract_factory():
    assert set(FACTORIES) == set(STAGES)


def make_image(channels: int, bit_depth: int, alpha: bool = False) -> Image:
    rng = np.random.default_rng(7)
    levels = 65535 if bit_depth == 16 else 255
    pixels = (np.rint(rng.random((40, 52, channels)) * levels) / levels).astype(np.float32)
    mask = rng.random((40, 52)).astype(np.float32) if alpha else None
    return Image(pixels=pixels, alpha=mask, bit_depth=bit_depth, format="png", metadata=Metadata())


@pytest.fixture
def ctx(tmp_path) -> StageContext:
    return StageContext(models=ModelStore(tmp_path / "cache"), device="cpu", precision="fp32")


@pytest.mark.parametrize(("kind", "index"), CASES)
@pytest.mark.parametrize(("channels", "bit_depth"), [(3, 8), (1, 16)])
def test_stage_contract(tmp_path, ctx, kind, index, channels, bit_depth):
    stage = FACTORIES[kind][index](tmp_path)
    assert stage.name == kind and isinstance(stage.version, int)
    image = make_image(channels, bit_depth, alpha=True)
    before = image.pixels.copy(), image.alpha.copy()

    first = stage.run(image, ctx)
    second = stage.run(image, ctx)

    out = first.image
    assert out.pixels.dtype == np.float32 and out.pixels.ndim == 3
    assert out.channels == channels and out.bit_depth == bit_depth
    assert out.pixels.min() >= 0.0 and out.pixels.max() <= 1.0
    assert (out.alpha is None) == (image.alpha is None)
    assert out.alpha.shape == out.pixels.shape[:2]
    np.testing.assert_array_equal(image.pixels, before[0])  # input untouched
    np.testing.assert_array_equal(image.alpha, before[1])
    json.dumps(dict(first.params))  # JSON-serialisable
    np.testing.assert_array_equal(second.image.pixels, out.pixels)  # deterministic
    assert dict(second.params) == dict(first.params)
