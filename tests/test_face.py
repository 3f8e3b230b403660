"""The face stage: real RetinaFace (mobilenet0.25) detection on real photos; randomly initialised
GFPGAN (the real architecture) and RestoreFormer prove alignment, paste-back, fidelity blending,
greyscale, masks and restoring into an upscaled target."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import shared_file
from modelfactory import (
    random_gfpgan,
    random_parsenet,
    random_restoreformer,
    random_retinaface,
)
from pydantic import ValidationError

from pipeline.errors import ModelNotAvailableError, StageError
from pipeline.image import Image, Metadata, decode
from pipeline.models import ModelStore
from pipeline.runtimes import MIN_AGREEMENT_DB, psnr8
from pipeline.stage import StageContext
from pipeline.stages.face import (
    _TEMPLATE,
    FaceOptions,
    FaceStage,
    _alignment,
    _crop,
    _ellipse_mask,
    _inverse,
    _paste,
)

ASTRONAUT = "corpus/faces/whole_imgs/skimage_astronaut.png"
# A black-and-white photo (one channel) of two people; the crops were checked by eye.
GROUP = "corpus/old_photos/historic/resr_00017_gray.png"
MOBILENET = "weights/detection_mobilenet0.25_Final.pth"
# Boxes the real mobilenet0.25 finds (x0, y0, x1, y1), verified by looking at the crops.
ASTRONAUT_FACE = (177.5, 56.4, 270.1, 176.4)
GROUP_LEFT_FACE = (86.5, 72.8, 194.6, 201.2)  # the man in the hat: the larger face
GROUP_RIGHT_FACE = (304.1, 86.5, 400.0, 206.3)  # the woman: nearer the centre


# --- fixtures: models built once for the module, one store so they load once -----------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("face-models")


@pytest.fixture(scope="module")
def store(folder) -> ModelStore:
    """A narrow RestoreFormer and a random detector under custom ids; the big random models
    (GFPGAN, ParseNet) are added by the fixtures that need them."""
    store = ModelStore(folder / "cache")
    store.import_file(random_restoreformer(folder / "rf.pth"), model_id="restoreformer-tiny")
    store.import_file(random_retinaface(folder / "det.pth"), model_id="retinaface-random")
    return store


@pytest.fixture(scope="module")
def ctx(store) -> StageContext:
    return StageContext(models=store, device="cpu", precision="auto")


@pytest.fixture(scope="module")
def real_ctx(store) -> StageContext:
    """The shared store with the real mobilenet0.25 detector (byte-identical to upstream's)."""
    store.import_file(shared_file(MOBILENET))  # its hash makes it retinaface-mobilenet0.25
    return StageContext(models=store, device="cpu", precision="auto")


@pytest.fixture(scope="module")
def astronaut() -> Image:
    return decode(shared_file(ASTRONAUT))


@pytest.fixture(scope="module")
def group() -> Image:
    return decode(shared_file(GROUP))


def face_stage(**options) -> FaceStage:
    """Torch unless a test asks for another engine (the engine tests below)."""
    options = {"detector": "retinaface-mobilenet0.25", "parser": None, "engine": "torch", **options}
    return FaceStage(FaceOptions(**options))


@pytest.fixture(scope="module")
def single(real_ctx, astronaut):
    """The astronaut through the narrow RestoreFormer at fidelity 1; input checked untouched."""
    before = astronaut.pixels.copy()
    result = face_stage(model="restoreformer-tiny", fidelity=1.0).run(astronaut, real_ctx)
    np.testing.assert_array_equal(astronaut.pixels, before)
    return result


@pytest.fixture(scope="module")
def gfpgan_runs(folder, real_ctx, astronaut):
    """The astronaut through random GFPGAN (~350 MB) at fidelity 1 and 0.5; input untouched."""
    real_ctx.models.import_file(random_gfpgan(folder / "gfpgan.pth"), model_id="gfpgan-random")
    before = astronaut.pixels.copy()
    runs = {
        f: face_stage(model="gfpgan-random", fidelity=f).run(astronaut, real_ctx)
        for f in (1.0, 0.5)
    }
    np.testing.assert_array_equal(astronaut.pixels, before)
    return runs


@pytest.fixture(scope="module")
def group_run(real_ctx, group):
    # "parsenet" is a registry id whose weights this store does not hold.
    stage = face_stage(model="restoreformer-tiny", parser="parsenet", fidelity=1.0)
    return stage.run(group, real_ctx)


def inside(box, margin: float) -> tuple[slice, slice]:
    """Rows and columns of `box` grown by `margin` of its size on each side."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    rows = slice(max(int(y0 - dy), 0), int(np.ceil(y1 + dy)))
    cols = slice(max(int(x0 - dx), 0), int(np.ceil(x1 + dx)))
    return rows, cols


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    weights = mask[ys, xs].astype(np.float64)
    return np.array([np.average(xs, weights=weights), np.average(ys, weights=weights)])


# --- detection with the real weights ------------------------------------------------------------


def test_real_mobilenet_finds_the_one_face_of_the_astronaut(single):
    params = json.loads(json.dumps(single.params))  # JSON-serialisable
    assert params["faces_found"] == 1 and params["faces_restored"] == 1
    assert params["detector"] == "retinaface-mobilenet0.25"
    (face,) = params["faces"]
    np.testing.assert_allclose(face["box"], ASTRONAUT_FACE, atol=3)
    assert face["score"] > 0.97
    left_eye, right_eye = face["landmarks"][:2]
    assert left_eye[0] < right_eye[0]  # the person's left eye on the image's left
    assert params["model"] == "restoreformer-tiny" and params["architecture"] == "RestoreFormer"
    assert len(params["model_sha256"]) == 64 and len(params["detector_sha256"]) == 64
    assert params["mask"] == "ellipse" and params["scale"] == [1.0, 1.0]


def test_real_mobilenet_finds_both_faces_of_the_black_and_white_group(group_run):
    boxes = sorted(face["box"] for face in group_run.params["faces"])
    assert group_run.params["faces_found"] == 2 and group_run.params["faces_restored"] == 2
    np.testing.assert_allclose(boxes, [GROUP_LEFT_FACE, GROUP_RIGHT_FACE], atol=3)


def test_large_images_are_detected_shrunk_with_boxes_in_input_coordinates(real_ctx, astronaut):
    big = astronaut.replace(
        pixels=cv2.resize(astronaut.pixels, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    )
    stage = face_stage(model="restoreformer-tiny", min_face_px=10_000)  # detect only
    result = stage.run(big, real_ctx)
    assert result.params["detection_size"] == [1600, 1600]
    assert result.params["faces_found"] == 1 and result.skipped == "no faces found"
    assert result.image is big and result.mask is None


# --- paste-back and fidelity ---------------------------------------------------------------------


def assert_pasted_at_the_face_only(result, astronaut: Image) -> None:
    """Changed pixels lie in the mask, the mask around the astronaut's face and over it."""
    out, mask = result.image.pixels, result.mask
    assert mask.dtype == np.uint8 and mask.shape == (astronaut.height, astronaut.width)
    assert out.dtype == np.float32 and out.shape == astronaut.pixels.shape
    untouched = mask == 0
    np.testing.assert_array_equal(out[untouched], astronaut.pixels[untouched])
    grown = np.zeros_like(mask)
    rows, cols = inside(ASTRONAUT_FACE, 0.5)
    grown[rows, cols] = mask[rows, cols]
    np.testing.assert_array_equal(grown, mask)  # the mask lies around the detected face only
    rows, cols = inside(ASTRONAUT_FACE, -0.3)
    assert (mask[rows, cols] == 255).all()  # and covers its middle fully
    assert np.abs(out[rows, cols] - astronaut.pixels[rows, cols]).max() > 0.1


def test_the_face_is_pasted_at_the_detected_box_and_nothing_else_changes(single, astronaut):
    assert_pasted_at_the_face_only(single, astronaut)


@pytest.mark.slow
def test_a_random_gfpgan_of_the_real_architecture_restores_the_face(gfpgan_runs, astronaut):
    result = gfpgan_runs[1.0]
    assert result.params["model"] == "gfpgan-random"
    assert result.params["architecture"] == "GFPGAN" and result.params["precision"] == "fp32"
    assert_pasted_at_the_face_only(result, astronaut)


def test_fidelity_zero_leaves_the_image_exactly_as_it_was_and_loads_nothing(tmp_path, astronaut):
    empty = StageContext(models=ModelStore(tmp_path / "empty"), device="cpu")
    result = FaceStage(FaceOptions(fidelity=0.0)).run(astronaut, empty)
    np.testing.assert_array_equal(result.image.pixels, astronaut.pixels)
    assert result.skipped == "fidelity is 0" and result.mask is None
    assert result.params["fidelity"] == 0.0


@pytest.mark.slow
def test_fidelity_really_blends_the_restored_and_the_original_face(gfpgan_runs, astronaut):
    full = gfpgan_runs[1.0].image.pixels - astronaut.pixels
    half = gfpgan_runs[0.5].image.pixels - astronaut.pixels
    # Exactly half the change: this also needs GFPGAN to restore the face identically in both
    # runs (its checkpoint's noise, not fresh noise per call).
    np.testing.assert_allclose(half, 0.5 * full, atol=2e-6)
    assert np.abs(half).max() > 0.05  # differs from fidelity 0
    assert np.abs(full - half).max() > 0.05  # and from fidelity 1
    assert gfpgan_runs[0.5].mask.max() == 128  # the mask records the weight pasted


# --- engines: the restorer on ncnn, OpenVINO or whichever auto measures fastest ----------------


def agreement_db(result, reference) -> float:
    """PSNR (8-bit) of two runs over the pixels the reference pasted (elsewhere both are the
    input, which would only inflate the number)."""
    np.testing.assert_array_equal(result.mask, reference.mask)
    pasted = reference.mask > 0
    assert pasted.any()
    return psnr8(result.image.pixels[pasted], reference.image.pixels[pasted])


def test_the_restorer_runs_on_openvino_and_agrees_with_torch(real_ctx, astronaut, single):
    result = face_stage(model="restoreformer-tiny", fidelity=1.0, engine="openvino").run(
        astronaut, real_ctx
    )
    params = result.params
    assert params["engine"] == "openvino" and params["precision"] == "fp32"
    assert set(params["converted_sha256"]) == {"model.xml", "model.bin"}
    assert agreement_db(result, single) >= MIN_AGREEMENT_DB
    assert single.params["engine"] == "torch"


def test_a_restorer_ncnn_cannot_convert_runs_on_torch_and_says_why(real_ctx, astronaut, single):
    result = face_stage(model="restoreformer-tiny", fidelity=1.0, engine="ncnn").run(
        astronaut, real_ctx
    )
    params = result.params
    assert params["engine"] == "torch" and params["engine_requested"] == "ncnn"
    assert params["engine_fallback"].startswith("ncnn: Unconvertible: ")
    np.testing.assert_array_equal(result.image.pixels, single.image.pixels)


def test_auto_measures_the_restorer_on_the_first_face_and_records_the_choice(
    real_ctx, astronaut, single
):
    runs = [
        face_stage(model="restoreformer-tiny", fidelity=1.0, engine="auto").run(astronaut, real_ctx)
        for _ in range(2)  # two stages, as two daemon runs: the second reads the decision
    ]
    for result, cached in zip(runs, (False, True), strict=True):
        params = json.loads(json.dumps(result.params))
        calibration = params["engine_calibration"]
        assert params["engine_requested"] == "auto" and calibration["cached"] is cached
        assert calibration["tile"] == [512, 512]  # the aligned face, the model's one size
        measured = {m["engine"]: m for m in calibration["measurements"]}
        assert {"torch", "openvino"} <= set(measured)
        assert "Unconvertible" in calibration["unavailable"]["ncnn"]
        assert measured[calibration["choice"]]["passed"]
        assert params["engine"] == calibration["choice"].split("@")[0].removesuffix("-bf16")
        assert agreement_db(result, single) >= MIN_AGREEMENT_DB
    assert (
        runs[0].params["engine_calibration"]["choice"]
        == (runs[1].params["engine_calibration"]["choice"])
    )


@pytest.mark.slow
def test_gfpgan_converts_to_openvino_and_agrees_with_torch(gfpgan_runs, real_ctx, astronaut):
    result = face_stage(model="gfpgan-random", fidelity=1.0, engine="openvino").run(
        astronaut, real_ctx
    )
    assert result.params["engine"] == "openvino" and result.params["architecture"] == "GFPGAN"
    assert agreement_db(result, gfpgan_runs[1.0]) >= MIN_AGREEMENT_DB


# --- greyscale, masks, targets ------------------------------------------------------------------


def test_a_one_channel_photo_keeps_one_channel_and_its_depth(group_run, group):
    out = group_run.image
    assert out.channels == 1 and out.bit_depth == group.bit_depth
    assert group_run.params["greyscale"] is True
    for box in (GROUP_LEFT_FACE, GROUP_RIGHT_FACE):
        rows, cols = inside(box, -0.3)
        assert (group_run.mask[rows, cols] == 255).all()
    untouched = group_run.mask == 0
    np.testing.assert_array_equal(out.pixels[untouched], group.pixels[untouched])


def test_an_rgb_photo_with_equal_channels_gets_grey_faces(real_ctx, astronaut):
    grey = cv2.cvtColor(astronaut.pixels, cv2.COLOR_RGB2GRAY)  # a scan of a B&W print
    image = astronaut.replace(pixels=np.repeat(grey[:, :, None], 3, axis=2))
    result = face_stage(model="restoreformer-tiny", fidelity=1.0).run(image, real_ctx)
    out = result.image.pixels
    assert result.params["greyscale"] is True and result.mask.max() == 255
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 1])
    np.testing.assert_array_equal(out[:, :, 1], out[:, :, 2])


@pytest.mark.slow  # a random ParseNet at its real size takes seconds on the CPU
def test_parsenet_shapes_the_mask_when_its_weights_are_in_the_store(
    folder, real_ctx, astronaut, single
):
    real_ctx.models.import_file(random_parsenet(folder / "parsenet.pth"), model_id="parsenet-r")
    stage = face_stage(model="restoreformer-tiny", parser="parsenet-r", fidelity=1.0)
    result = stage.run(astronaut, real_ctx)
    params = result.params
    assert params["mask"] == "parsenet" and params["parser"] == "parsenet-r"
    assert len(params["parser_sha256"]) == 64
    assert result.mask.max() > 0 and not np.array_equal(result.mask, single.mask)
    untouched = result.mask == 0
    np.testing.assert_array_equal(result.image.pixels[untouched], astronaut.pixels[untouched])


def test_a_parser_missing_from_the_store_falls_back_to_the_ellipse(group_run):
    assert group_run.params["mask"] == "ellipse" and "parser" not in group_run.params
    assert group_run.mask.max() == 255


def test_faces_go_into_a_2x_target_at_twice_the_coordinates(real_ctx, astronaut, single):
    stage = face_stage(model="restoreformer-tiny", fidelity=1.0)
    size = (astronaut.width * 2, astronaut.height * 2)
    upscaled = cv2.resize(astronaut.pixels, size, interpolation=cv2.INTER_CUBIC)
    upscaled = np.clip(upscaled, 0, 1)
    alpha = np.full(upscaled.shape[:2], 0.75, dtype=np.float32)
    target = astronaut.replace(pixels=upscaled, alpha=alpha, bit_depth=16)
    result = stage.run(astronaut, real_ctx, target=target)

    assert result.mask.shape == (size[1], size[0]) and result.image.pixels.shape == upscaled.shape
    assert result.params["scale"] == [2.0, 2.0]
    assert result.params["faces"] == single.params["faces"]  # input coordinates
    np.testing.assert_allclose(centroid(result.mask), 2 * centroid(single.mask) + 0.5, atol=0.5)
    untouched = result.mask == 0
    # 16-bit samples (bicubic values between 8-bit levels) outside the face are kept exactly.
    np.testing.assert_array_equal(result.image.pixels[untouched], upscaled[untouched])
    assert result.image.bit_depth == 16 and result.image.alpha is alpha


def test_a_target_that_is_not_the_image_scaled_is_refused(ctx, astronaut):
    squashed = astronaut.replace(pixels=np.zeros((1024, 700, 3), np.float32))
    with pytest.raises(StageError, match="not image 512x512 scaled by one factor"):
        face_stage(model="restoreformer-tiny").run(astronaut, ctx, target=squashed)


# --- which faces -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "chosen", "other"),
    [
        ({"max_faces": 1}, GROUP_LEFT_FACE, GROUP_RIGHT_FACE),  # the largest
        ({"only_center_face": True}, GROUP_RIGHT_FACE, GROUP_LEFT_FACE),  # the nearest centre
    ],
)
def test_max_faces_and_only_center_face_choose_which_faces(real_ctx, group, options, chosen, other):
    result = face_stage(model="restoreformer-tiny", **options).run(group, real_ctx)
    assert result.params["faces_found"] == 2 and result.params["faces_restored"] == 1
    (face,) = result.params["faces"]
    np.testing.assert_allclose(face["box"], chosen, atol=3)
    rows, cols = inside(chosen, -0.3)
    assert (result.mask[rows, cols] > 0).all()
    rows, cols = inside(other, -0.3)
    assert (result.mask[rows, cols] == 0).all()


def test_faces_smaller_than_min_face_px_are_skipped(real_ctx, group):
    result = face_stage(model="restoreformer-tiny", min_face_px=200).run(group, real_ctx)
    assert result.skipped == "no faces found" and result.mask is None
    assert result.params["faces_found"] == 2 and result.params["faces"] == []
    assert result.image is group


# --- errors, options, robustness (no real weights needed) --------------------------------------


def test_missing_weights_are_reported_by_model_id(tmp_path, store):
    image = Image(np.zeros((64, 64, 3), np.float32), None, 8, "png", Metadata())
    empty = StageContext(models=ModelStore(tmp_path / "empty"), device="cpu")
    stage = FaceStage()
    assert stage.models() == ["gfpgan-1.4", "retinaface-resnet50"]
    with pytest.raises(ModelNotAvailableError, match=r"gfpgan-1\.4"):
        stage.run(image, empty)
    restorer = str(store.path_for(store.spec("restoreformer-tiny")))
    with pytest.raises(ModelNotAvailableError, match="retinaface-resnet50"):
        FaceStage(FaceOptions(model=restorer)).run(image, empty)


def test_a_model_that_is_not_a_face_restorer_is_refused_by_name(ctx):
    image = Image(np.zeros((64, 64, 3), np.float32), None, 8, "png", Metadata())
    stage = FaceStage(FaceOptions(model="retinaface-random", detector="retinaface-random"))
    with pytest.raises(StageError, match="retinaface-random is not GFPGAN or RestoreFormer"):
        stage.run(image, ctx)


def test_options_are_checked_and_an_empty_parser_means_the_ellipse():
    assert FaceOptions(parser="").parser is None
    for bad in ({"fidelity": 1.5}, {"confidence": -0.1}, {"max_faces": -1}, {"colour": 1}):
        with pytest.raises(ValidationError):
            FaceOptions(**bad)


@pytest.mark.parametrize(("height", "width", "channels"), [(1, 1, 3), (5, 7, 1)])
def test_tiny_images_with_faces_everywhere_do_not_crash(ctx, height, width, channels):
    """A random detector at confidence 0 reports faces far larger than the image."""
    pixels = np.random.default_rng(3).random((height, width, channels)).astype(np.float32)
    image = Image(pixels, None, 16, "png", Metadata())
    stage = FaceStage(
        FaceOptions(
            model="restoreformer-tiny",
            detector="retinaface-random",
            parser=None,
            confidence=0.0,
            min_face_px=0,
            max_faces=1,
        )
    )
    result = stage.run(image, ctx)
    assert result.params["faces_restored"] == 1
    assert result.image.pixels.shape == pixels.shape and result.mask.shape == (height, width)
    assert result.image.pixels.min() >= 0 and result.image.pixels.max() <= 1


# --- geometry: the aligned crop pasted back lands where it came from -----------------------------


def smooth_image(height: int, width: int) -> np.ndarray:
    coarse = np.random.default_rng(5).random((12, 10, 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_the_aligned_crop_pasted_back_reproduces_the_photo(scale):
    pixels = smooth_image(300, 260)
    angle, size = np.deg2rad(12), 0.3  # a tilted face about 150 px across
    rotation = size * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = _TEMPLATE @ rotation.T + (60, 70)
    affine = _alignment(landmarks)
    crop = _crop(pixels, affine)
    size = (pixels.shape[1] * scale, pixels.shape[0] * scale)
    target = cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR) if scale > 1 else pixels
    out, mask = target.copy(), np.zeros(target.shape[:2], np.uint8)
    assert _paste(out, mask, crop, _ellipse_mask(), 1.0, _inverse(affine, (scale, scale)))
    full = mask == 255
    assert full.sum() > 3000 * scale**2
    ours = np.abs(out[full] - target[full]).max()
    assert ours < 0.005
    if scale > 1:  # facexlib's offset of s/2 lands half an output pixel off
        shifted = _inverse(affine, (scale, scale)) + np.array([[0, 0, 0.5], [0, 0, 0.5]])
        theirs = target.copy()
        _paste(theirs, np.zeros_like(mask), crop, _ellipse_mask(), 1.0, shifted)
        assert ours < np.abs(theirs[full] - target[full]).max()
