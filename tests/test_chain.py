"""The chain engine on its own, with toy stages: order rules, the face-at-output-resolution
hand-off, the up-front model check and the records it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pytest

from pipeline.chain import Chain, ChainConfigError, build_chain
from pipeline.image import Image, Metadata
from pipeline.models import ModelStore
from pipeline.stage import StageContext, StageOptions, StageResult


def _image(width: int = 8, height: int = 6) -> Image:
    pixels = np.linspace(0, 1, width * height * 3, dtype=np.float32).reshape(height, width, 3)
    return Image(pixels=pixels, alpha=None, bit_depth=8, format="png", metadata=Metadata())


@dataclass
class Toy:
    """A stage that logs its calls; `scale` makes it an upscaler."""

    name: str
    scale: int = 1
    refs: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    version: ClassVar[int] = 1
    Options: ClassVar[type[StageOptions]] = StageOptions

    def models(self) -> list[str]:
        return self.refs

    def run(self, image: Image, ctx: StageContext, target: Image | None = None) -> StageResult:
        self.calls.append({"size": (image.width, image.height), "target": target})
        base = target if target is not None else image
        pixels = np.repeat(np.repeat(base.pixels, self.scale, 0), self.scale, 1)
        mask = np.full(pixels.shape[:2], 255, np.uint8) if self.name == "face" else None
        return StageResult(base.replace(pixels=pixels), {"toy": self.name}, mask=mask)


@pytest.fixture
def ctx(tmp_path) -> StageContext:
    return StageContext(models=ModelStore(tmp_path / "cache"))


def test_face_before_upscale_pastes_into_the_upscaled_image(ctx):
    face, upscale = Toy("face"), Toy("upscale", scale=4)
    result = Chain((face, upscale)).run(_image(), ctx)
    assert upscale.calls[0]["size"] == (8, 6)
    assert face.calls[0]["size"] == (8, 6)  # faces are found on the smaller image ...
    assert face.calls[0]["target"].pixels.shape == (24, 32, 3)  # ... and pasted at 4x
    assert result.image.pixels.shape == (24, 32, 3)
    assert [record.name for record in result.stages] == ["upscale", "face"]
    assert result.masks["face"].shape == (24, 32)


def test_stages_without_an_upscale_after_face_run_in_order(ctx):
    first, face = Toy("denoise"), Toy("face")
    result = Chain((first, face)).run(_image(), ctx)
    assert face.calls[0]["target"] is None
    assert [record.name for record in result.stages] == ["denoise", "face"]


@pytest.mark.parametrize(
    ("kinds", "line"),
    [
        (
            ["upscale", "denoise"],
            "pipeline.stages[1].kind: 'denoise' after 'upscale' (stage 0): put 'denoise' first",
        ),
        (["denoise", "denoise"], "pipeline.stages[1].kind: 'denoise' again (already stage 0)"),
        (["upscale", "upscale"], "pipeline.stages[1].kind: 'upscale' again"),
    ],
)
def test_orders_that_make_no_sense_are_refused_with_the_key_path(kinds, line):
    with pytest.raises(ChainConfigError) as caught:
        build_chain([{"kind": kind} for kind in kinds])
    assert any(problem.startswith(line) for problem in caught.value.problems), caught.value
    assert all("\n" not in problem for problem in caught.value.problems)


def test_every_problem_of_a_chain_is_reported_at_once():
    specs = [{"kind": "upscale", "tile": 8}, {"kind": "denoise", "h": -1}, {"kind": "blur"}]
    with pytest.raises(ChainConfigError) as caught:
        build_chain(specs, path="presets.mine")
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "presets.mine[0].tile",
        "presets.mine[1].h",
        "presets.mine[2].kind",
        "presets.mine[1].kind",
    ]


def test_missing_weights_are_reported_before_any_image(tmp_path):
    store = ModelStore(tmp_path / "cache", auto_fetch=False)
    chain = Chain((Toy("denoise"), Toy("face", refs=["gfpgan-1.4", "retinaface-resnet50"])))
    with pytest.raises(ChainConfigError) as caught:
        chain.check_models(store, path="presets.family")
    assert [p.split(": ")[0] for p in caught.value.problems] == [
        "presets.family[1] (face)",
        "presets.family[1] (face)",
    ]
    assert "gfpgan-1.4: weights are not in the cache" in caught.value.problems[0]
    assert "retinaface-resnet50" in caught.value.problems[1]


def test_fetchable_and_local_models_pass_the_check(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    store = ModelStore(tmp_path / "cache", auto_fetch=True)
    Chain((Toy("upscale", refs=["realesrgan-x4plus", str(weights)]),)).check_models(store)
    offline = ModelStore(tmp_path / "cache", auto_fetch=False)
    with pytest.raises(ChainConfigError, match="realesrgan-x4plus"):
        Chain((Toy("upscale", refs=["realesrgan-x4plus"]),)).check_models(offline)


def test_unknown_model_refs_are_named(tmp_path):
    store = ModelStore(tmp_path / "cache")
    with pytest.raises(ChainConfigError, match="'no-such-model' is neither a known model id"):
        Chain((Toy("upscale", refs=["no-such-model"]),)).check_models(store)
