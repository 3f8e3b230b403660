"""The restore stage: colour cast and fading corrected on real photos and balanced ones left
alone; dust and scratches drawn (seeded) on real photos found and repaired without touching
clean Set5/Set14 images; 16-bit, greyscale, alpha and the input kept; FBCNN and LaMa of the
real architectures loaded through the hash-checking store."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CORPUS, shared_file
from modelfactory import random_defectunet, random_lama, tiny_dncnn, tiny_fbcnn
from pydantic import ValidationError

from pipeline.chain import ChainConfigError, build_chain
from pipeline.errors import StageError
from pipeline.files import sha256_file
from pipeline.image import Image, Metadata, decode
from pipeline.models import ModelStore
from pipeline.stage import StageContext
from pipeline.stages.restore import RestoreOptions, RestoreStage
from pipeline.stages.restore.learned import mask_from_probability

SET5 = ["baby", "bird", "butterfly", "head", "woman"]
SET14 = [
    "baboon", "barbara", "bridge", "coastguard", "comic", "face", "flowers",
    "foreman", "lenna", "man", "monarch", "pepper", "ppt3", "zebra",
]  # fmt: skip
CLEAN = [f"Set5/HR/{name}.png" for name in SET5] + [f"Set14/HR/{name}.png" for name in SET14]
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def clean_image(relative: str) -> Image:
    return decode(shared_file(f"corpus/sr_benchmark/{relative}"))


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    if where is not None:
        a, b = a[where], b[where]
    error = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 10 * np.log10(1 / max(error, 1e-12))


def luma(pixels: np.ndarray) -> np.ndarray:
    return pixels @ LUMA if pixels.shape[2] == 3 else pixels[:, :, 0]


def draw_defects(
    pixels: np.ndarray, seed: int, *, scratches: int, specks: int, plain_only: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Hairline scratches (1-2 px, anti-aliased, 30-200 px long) and dust specks (radius
    0.8-3 px): white where the background is dark, black where it is light, as dust and
    scratches show on prints and scans. With `plain_only` every defect lies on a plain region
    (sky, skin, walls), apart from the others. Returns the damaged pixels and the pixels the
    damage changed by more than 0.15."""
    rng = np.random.default_rng(seed)
    height, width = pixels.shape[:2]
    brightness = luma(pixels)
    mean = cv2.blur(brightness, (31, 31))
    spread = np.sqrt(np.maximum(cv2.blur(brightness**2, (31, 31)) - mean**2, 0))
    plain = spread < 0.04 if plain_only else np.ones_like(spread, bool)
    out, used, placed = pixels.astype(np.float32).copy(), np.zeros((height, width), bool), 0
    for _ in range(2000):
        if placed == scratches + specks:
            break
        shape = np.zeros((height, width), np.uint8)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        if placed < scratches:
            length, angle = rng.uniform(30, 200 if not plain_only else 90), rng.uniform(0, np.pi)
            dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
            ends = np.round(np.array([[cx - dx, cy - dy], [cx + dx, cy + dy]]) * 16)
            thickness = int(rng.integers(1, 3))
            cv2.polylines(shape, [ends.astype(np.int32)], False, 255, thickness, cv2.LINE_AA, 4)
        else:
            axes = (int(rng.uniform(0.8, 3) * 16), int(rng.uniform(0.8, 3) * 16))
            centre = (int(cx * 16), int(cy * 16))
            cv2.ellipse(shape, centre, axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, 4)
        inside = shape > 0
        crowded = cv2.dilate(used.view(np.uint8), np.ones((9, 9), np.uint8)) > 0
        if not inside.any() or not plain[inside].all() or crowded[inside].any():
            continue
        value = (
            rng.uniform(0.92, 1.0) if np.median(brightness[inside]) < 0.5 else rng.uniform(0, 0.06)
        )
        cover = (shape.astype(np.float32) / 255)[:, :, None]
        out = out * (1 - cover) + value * cover
        used |= inside
        placed += 1
    assert placed == scratches + specks, "the image has too little plain area for the defects"
    return out.astype(np.float32), np.abs(out - pixels).max(axis=2) > 0.15


@pytest.fixture
def ctx(tmp_path) -> StageContext:
    return StageContext(models=ModelStore(tmp_path / "cache"), device="cpu", precision="fp32")


def run(image: Image, ctx: StageContext, **options):
    """Models on torch unless a test asks for another engine."""
    return RestoreStage(RestoreOptions(**{"engine": "torch", **options})).run(image, ctx)


# --- clean, balanced images are left alone ----------------------------------------------------


@pytest.mark.parametrize("relative", CLEAN)
def test_defaults_leave_clean_set5_and_set14_images_at_40_db_or_more(ctx, relative):
    """Baboon's whiskers, zebra stripes, comic lines, text, natural images short of 0..1:
    nothing is stretched, nothing "repaired" beyond a few pixels."""
    image = clean_image(relative)
    result = run(image, ctx)
    assert result.params["colour"]["white_balance"] == 0.0
    assert result.params["colour"]["levels"] == 0.0
    assert psnr(result.image.pixels, image.pixels) >= 40.0


def test_a_clean_balanced_image_is_skipped_untouched_with_the_reason(ctx):
    image = clean_image("Set5/HR/baby.png")
    result = run(image, ctx)
    assert result.skipped == "already balanced, no defects found"
    assert result.mask is None and result.params["parts"] == []
    assert result.image.pixels is image.pixels
    assert result.params["dust"]["repaired_pixels"] == 0


# --- fading and colour cast -------------------------------------------------------------------


def dye_cast(pixels: np.ndarray, left=(0.55, 0.75, 0.9), scale: float = 1.0) -> np.ndarray:
    """A print whose dyes lost density (cyan most): each channel's blacks lift by the share
    of its dye lost, so the cast shows in the shadows too; `scale` dims the paper as well."""
    return (scale * (1 - np.array(left, np.float32) * (1 - pixels))).astype(np.float32)


def test_a_dye_cast_is_corrected(ctx):
    """Reddish, lifted blacks and a neutral white (cyan dye at 50 %, magenta at 75 %)."""
    image = clean_image("Set14/HR/zebra.png")
    cast = dye_cast(image.pixels, (0.5, 0.75, 0.9))
    result = run(image.replace(pixels=cast), ctx, dust=False)
    assert result.params["colour"]["white_balance"] == 1.0
    assert result.params["colour"]["levels"] == 0.0
    assert psnr(result.image.pixels, image.pixels) > psnr(cast, image.pixels) + 8


def test_a_cast_over_deep_neutral_blacks_is_coloured_light_and_left(ctx):
    """Channel gains 1, 0.8, 0.55 keep the blacks black: a sunset, tungsten light or a warm
    grade look the same, so nothing says the colour is not the scene's."""
    image = clean_image("Set14/HR/zebra.png")
    cast = (image.pixels * np.array([1.0, 0.8, 0.55], np.float32)).astype(np.float32)
    result = run(image.replace(pixels=cast), ctx, dust=False)
    colour = result.params["colour"]
    assert colour["cast"] > 0.4 and colour["evidence"]["shadow_cast"] < 0.05
    assert "neutral blacks: no dye-fade evidence" in colour["white_balance_refused"]
    assert result.image.pixels is cast


def test_a_neutral_fade_is_left_as_a_contrast_decision(ctx):
    """Lifted blacks and dimmed whites, 0.3 + 0.55 x, the same in every channel: a soft print,
    mist or flare looks the same, and no dye's colour shows that a dye faded."""
    image = clean_image("Set14/HR/flowers.png")
    faded = (0.3 + 0.55 * image.pixels).astype(np.float32)
    result = run(image.replace(pixels=faded), ctx, dust=False)
    colour = result.params["colour"]
    assert colour["fade"] > 0.4 and colour["levels"] == 0.0
    assert any(doubt.startswith("no dye-fade evidence") for doubt in colour["levels_refused"])
    assert result.image.pixels is faded


def test_a_faded_and_cast_print_gets_both_corrections(ctx):
    """Dyes at 40 / 60 / 75 % on a paper dimmed to 0.75: the blacks part and the range is short."""
    image = clean_image("Set5/HR/head.png")
    damaged = dye_cast(image.pixels, (0.4, 0.6, 0.75), 0.75)
    result = run(image.replace(pixels=damaged), ctx, dust=False)
    colour = result.params["colour"]
    assert (colour["white_balance"], colour["levels"]) == (1.0, 1.0)
    assert result.params["parts"] == ["colour"]
    assert psnr(result.image.pixels, image.pixels) > psnr(damaged, image.pixels) + 15


def test_a_cast_just_over_the_threshold_is_corrected_only_partly(ctx):
    """The ramp: no jump from untouched to fully corrected as the cast grows."""
    image = clean_image("Set14/HR/zebra.png")
    mild = dye_cast(image.pixels, (0.6, 0.75, 0.9))
    result = run(image.replace(pixels=mild), ctx, dust=False)
    colour = result.params["colour"]
    assert 0.30 < colour["cast"] < 0.40
    assert 0.0 < colour["white_balance"] < 1.0
    full = run(image.replace(pixels=mild), ctx, dust=False, cast_threshold=0.05)
    moved, full_move = (np.abs(out.image.pixels - mild).mean() for out in (result, full))
    assert 0 < moved < full_move


def test_cast_threshold_one_turns_white_balance_off(ctx):
    image = clean_image("Set14/HR/zebra.png")
    cast = dye_cast(image.pixels)
    result = run(image.replace(pixels=cast), ctx, dust=False, cast_threshold=1.0)
    assert result.skipped == "already balanced"
    np.testing.assert_array_equal(result.image.pixels, cast)


# --- colour that never harms: toned, low-key, high-key and saturated pictures -----------------


def city100_crop(top: int, left: int) -> np.ndarray:
    path = shared_file("corpus/real_lr_hr_pairs/City100_NikonD5500/061H.PNG")
    return np.ascontiguousarray(decode(path).pixels[top : top + 256, left : left + 256])


def percentile_rule_gain(pixels: np.ndarray) -> np.ndarray:
    """The gains the percentile rule alone (the stage before evidence) would apply."""
    from pipeline.stages.restore import colour

    black, white = np.percentile(pixels.reshape(-1, 3), [0.5, 99.5], axis=0).astype(np.float64)
    low, high = float(black.min()), float(white.max())
    cast = float(max((black - low).max(), (high - white).max())) / (high - low)
    balance = colour._smoothstep(0.30, cast)
    gain, _ = colour._affine(black, white, balance, colour._smoothstep(0.25, 1 - high + low))
    return gain


def test_a_dark_scene_with_a_saturated_blue_object_is_left_alone(ctx):
    """The issue's case: a 256 px night crop (a real photo's sky-and-roof crop at night
    exposure, x^2.2 / 2) whose brightest thing is a saturated blue. The percentile rule alone
    multiplies R/G/B by about 8.7 / 4.8 / 3.0 and greys the blue; the stage leaves it."""
    night = (city100_crop(64, 896) ** 2.2 / 2).astype(np.float32)
    gain = percentile_rule_gain(night)
    assert gain[0] > 6 and gain[2] < gain[1] < gain[0]  # the harmful case is real
    image = clean_image("Set5/HR/baby.png").replace(pixels=night)
    result = run(image, ctx, dust=False)
    assert result.skipped == "already balanced"
    assert result.image.pixels is night
    assert result.params["colour"]["white_balance"] == 0.0
    assert result.params["colour"]["levels"] == 0.0


def tone(relative: str, colour: tuple[float, float, float]) -> np.ndarray:
    """A toned print of a real photo: the toner colours the mid-tones, the paper stays white."""
    y = luma(clean_image(relative).pixels)[:, :, None]
    return np.clip(y + np.array(colour, np.float32) * 4 * y * (1 - y), 0, 1).astype(np.float32)


@pytest.mark.parametrize(
    ("relative", "toner"),
    [
        ("Set14/HR/lenna.png", (0.11, 0.0, -0.11)),  # sepia
        ("Set5/HR/baby.png", (-0.13, 0.0, 0.1)),  # cyanotype blue
        ("Set14/HR/zebra.png", (0.05, -0.04, 0.02)),  # selenium
        ("Set14/HR/man.png", (0.11, 0.0, -0.11)),
    ],
)
def test_toned_prints_keep_their_tone(ctx, relative, toner):
    toned = tone(relative, toner)
    image = clean_image(relative).replace(pixels=toned)
    result = run(image, ctx, dust=False)
    assert result.params["colour"]["white_balance"] == 0.0
    assert psnr(result.image.pixels, toned) > 40


@pytest.mark.parametrize(
    "relative", ["Set5/HR/baby.png", "Set14/HR/pepper.png", "Set14/HR/lenna.png"]
)
@pytest.mark.parametrize("key", ["low", "high", "saturated"])
def test_low_key_high_key_and_saturated_pictures_are_left_alone(ctx, relative, key):
    pixels = clean_image(relative).pixels
    if key == "low":  # night or dark interior: no white at all
        changed = pixels**2.2 / 2
    elif key == "high":
        changed = 1 - (1 - pixels) ** 2
    else:
        hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = np.clip(hsv[:, :, 1] * 1.6, 0, 1)
        changed = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    changed = np.clip(changed, 0, 1).astype(np.float32)
    image = clean_image(relative).replace(pixels=changed)
    result = run(image, ctx, dust=False)
    assert psnr(result.image.pixels, changed) > 40


def delta_e(a: np.ndarray, b: np.ndarray) -> float:
    la, lb = (cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2Lab) for x in (a, b))
    return float(np.mean(np.linalg.norm(la - lb, axis=2)))


@pytest.mark.parametrize("relative", ["Set5/HR/head.png", "Set14/HR/comic.png"])
def test_simulated_dye_fading_is_corrected(ctx, relative):
    """Dye density left 0.55 / 0.75 / 0.9 (cyan fades first, blacks lift unequally) on a
    yellowed paper base: the colour error against the unfaded print falls by half or more."""
    clean = clean_image(relative).pixels
    left, paper = np.array([0.55, 0.75, 0.9], np.float32), np.array([1, 0.95, 0.82], np.float32)
    faded = ((1 - left * (1 - clean)) * paper).astype(np.float32)
    result = run(clean_image(relative).replace(pixels=faded), ctx, dust=False)
    assert result.params["colour"]["white_balance"] == 1.0
    assert delta_e(result.image.pixels, clean) < 0.5 * delta_e(faded, clean)


# --- dust and scratches -----------------------------------------------------------------------


PLAIN_CASES = [("Set5/HR/baby.png", 1), ("Set14/HR/monarch.png", 2), ("Set14/HR/pepper.png", 3)]


@pytest.mark.parametrize(("relative", "seed"), PLAIN_CASES)
def test_defects_on_plain_regions_are_found_and_repaired(ctx, relative, seed):
    image = clean_image(relative)
    damaged, hit = draw_defects(image.pixels, seed, scratches=4, specks=16, plain_only=True)
    result = run(image.replace(pixels=damaged), ctx, colour=False)
    mask = result.mask
    assert mask is not None and mask.dtype == np.uint8 and mask.shape == hit.shape
    assert set(np.unique(mask)) <= {0, 255}
    assert np.mean(mask[hit] > 0) >= 0.8  # most damaged pixels are marked
    near_damage = cv2.dilate(hit.view(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert np.count_nonzero((mask > 0) & ~near_damage) <= 0.02 * np.count_nonzero(hit)
    before = psnr(damaged, image.pixels, hit)
    after = psnr(result.image.pixels, image.pixels, hit)
    assert after > before + 5  # the few missed pixels dominate: 4-6 dB before, 11-15 after
    assert result.params["dust"]["repaired_pixels"] == np.count_nonzero(mask)
    assert result.params["dust"]["defects"] >= 10


@pytest.mark.parametrize("relative", CLEAN)
def test_psnr_in_the_damaged_region_rises_on_every_image(ctx, relative):
    """Defects anywhere, busy regions included, where many are (rightly) left alone."""
    image = clean_image(relative)
    seed = CLEAN.index(relative)
    damaged, hit = draw_defects(image.pixels, seed, scratches=6, specks=24, plain_only=False)
    result = run(image.replace(pixels=damaged), ctx, colour=False)
    assert psnr(result.image.pixels, image.pixels, hit) > psnr(damaged, image.pixels, hit)


def test_only_masked_pixels_change_when_only_dust_runs(ctx):
    image = clean_image("Set5/HR/baby.png")
    damaged, _ = draw_defects(image.pixels, 5, scratches=2, specks=8, plain_only=True)
    result = run(image.replace(pixels=damaged), ctx, colour=False)
    untouched = result.mask == 0
    np.testing.assert_array_equal(result.image.pixels[untouched], damaged[untouched])
    assert not np.array_equal(result.image.pixels[~untouched], damaged[~untouched])


def test_higher_sensitivity_finds_more(ctx):
    image = clean_image("Set14/HR/lenna.png")
    damaged, _ = draw_defects(image.pixels, 7, scratches=6, specks=24, plain_only=False)
    found = [
        run(image.replace(pixels=damaged), ctx, colour=False, sensitivity=s).params["dust"]
        for s in (0.0, 0.5, 1.0)
    ]
    counts = [part["repaired_pixels"] for part in found]
    assert counts[0] < counts[1] < counts[2]
    assert [part["sensitivity"] for part in found] == [0.0, 0.5, 1.0]


def plain_grey(value: float = 0.7, size: int = 160) -> np.ndarray:
    rng = np.random.default_rng(0)  # a little grain, as on any scan
    return np.clip(value + rng.normal(0, 0.005, (size, size, 3)), 0, 1).astype(np.float32)


def test_wide_features_are_never_repaired_but_thin_ones_are(ctx):
    pixels = plain_grey()
    cv2.line(pixels, (20, 40), (140, 44), (0.02, 0.02, 0.02), 2, cv2.LINE_AA)  # a hairline
    cv2.line(pixels, (20, 100), (140, 104), (0.02, 0.02, 0.02), 9, cv2.LINE_AA)  # a real bar
    image = Image(pixels=pixels, alpha=None, bit_depth=8, format="png", metadata=Metadata())
    result = run(image, ctx, colour=False)
    assert result.mask is not None
    assert result.mask[36:49].any() and not result.mask[90:115].any()
    wide = run(image, ctx, colour=False, max_defect_px=12)
    assert wide.mask[90:115].any()


def test_a_dark_strip_along_the_scan_border_is_not_a_scratch(ctx):
    pixels = plain_grey()
    pixels[:, :2] = 0.02  # the scanner lid's shadow on the left edge
    image = Image(pixels=pixels, alpha=None, bit_depth=8, format="png", metadata=Metadata())
    assert run(image, ctx, colour=False).mask is None


def test_navier_stokes_inpainting_repairs_too(ctx):
    image = clean_image("Set5/HR/baby.png")
    damaged, hit = draw_defects(image.pixels, 11, scratches=2, specks=8, plain_only=True)
    result = run(image.replace(pixels=damaged), ctx, colour=False, inpaint="ns")
    assert result.params["dust"]["inpaint"] == "ns"
    assert psnr(result.image.pixels, image.pixels, hit) > psnr(damaged, image.pixels, hit) + 8


# --- depth, channels, alpha, input ------------------------------------------------------------


def test_16_bit_input_is_not_quantised_to_8_bit_levels(ctx):
    image = clean_image("Set14/HR/zebra.png")
    cast = dye_cast(image.pixels)
    damaged, _ = draw_defects(cast, 3, scratches=2, specks=10, plain_only=True)
    sixteen = (np.rint(damaged * 65535) / 65535).astype(np.float32)
    result = run(image.replace(pixels=sixteen, bit_depth=16), ctx)
    out = result.image.pixels
    assert result.image.bit_depth == 16 and result.params["parts"] == ["colour", "dust"]
    # 8-bit values would all be multiples of 257 in 16-bit steps.
    assert len(np.unique(np.rint(out * 65535) % 257)) > 100
    repaired = result.mask > 0
    assert len(np.unique(np.rint(out[repaired] * 65535) % 257)) > 50


def test_greyscale_stays_greyscale_and_is_repaired(ctx):
    image = clean_image("Set14/HR/bridge.png")
    assert image.channels == 1
    damaged, hit = draw_defects(image.pixels, 4, scratches=6, specks=24, plain_only=False)
    result = run(image.replace(pixels=damaged), ctx)
    assert result.image.pixels.shape == image.pixels.shape
    assert result.image.pixels.dtype == np.float32
    assert psnr(result.image.pixels, image.pixels, hit) > psnr(damaged, image.pixels, hit)


def test_input_and_alpha_are_untouched(ctx):
    image = clean_image("Set14/HR/zebra.png")
    cast = dye_cast(image.pixels)
    damaged, _ = draw_defects(cast, 8, scratches=2, specks=8, plain_only=True)
    # Mostly opaque: the cast is read on the opaque pixels, and a balanced half-image's white
    # point differs too much from the whole one's for white balance to stay within its bound.
    alpha = np.linspace(0.4, 1, damaged.shape[0] * damaged.shape[1], dtype=np.float32)
    source = image.replace(pixels=damaged, alpha=alpha.reshape(damaged.shape[:2]))
    before = source.pixels.copy()
    result = run(source, ctx)
    np.testing.assert_array_equal(source.pixels, before)
    assert result.image.alpha is source.alpha
    assert result.params["parts"] == ["colour", "dust"]


def test_params_record_what_shaped_the_output_as_json(ctx):
    image = clean_image("Set14/HR/zebra.png")
    cast = dye_cast(image.pixels)
    result = run(image.replace(pixels=cast), ctx, dust=False)
    params = json.loads(json.dumps(result.params))
    colour = params["colour"]
    assert {"cast", "fade", "black", "white", "gain", "offset", "percentiles"} <= set(colour)
    assert len(colour["gain"]) == 3 and params["dust"] is None and params["artefacts"] is None


# --- learned models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fbcnn(tmp_path_factory) -> Path:
    return tiny_fbcnn(tmp_path_factory.mktemp("fbcnn") / "fbcnn.pth")


def test_an_artefact_model_runs_tiled_through_the_store_and_records_its_hash(ctx, fbcnn):
    image = clean_image("Set5/HR/head.png")
    crop = image.replace(pixels=np.ascontiguousarray(image.pixels[:96, :80]))
    stage = RestoreStage(
        RestoreOptions(artefact_model=str(fbcnn), colour=False, dust=False, tile=48)
    )
    result = stage.run(crop, ctx)
    whole = RestoreStage(
        RestoreOptions(artefact_model=str(fbcnn), colour=False, dust=False, tile=0)
    )
    # Within one 8-bit level of the whole image: the tiles share the 32 px overlap and no more
    # (a random FBCNN sees far; its worst pixel here is 0.75 of a level off).
    np.testing.assert_allclose(result.image.pixels, whole.run(crop, ctx).image.pixels, atol=1 / 255)
    artefacts = json.loads(json.dumps(result.params))["artefacts"]
    assert artefacts["architecture"] == "FBCNN"
    assert artefacts["model_sha256"] == sha256_file(fbcnn)
    assert artefacts["tile"] == 48 and result.params["parts"] == ["artefacts"]
    assert not np.array_equal(result.image.pixels, crop.pixels)


def test_a_colour_artefact_model_runs_on_greyscale_through_rgb(ctx, fbcnn):
    image = clean_image("Set14/HR/bridge.png")
    crop = image.replace(pixels=np.ascontiguousarray(image.pixels[:64, :64]))
    result = run(crop, ctx, artefact_model=str(fbcnn), colour=False, dust=False)
    assert result.image.pixels.shape == (64, 64, 1)
    assert result.params["artefacts"]["greyscale_via_rgb"] is True


def test_models_lists_the_weights_the_options_need(tmp_path):
    assert RestoreStage().models() == []
    stage = RestoreStage(RestoreOptions(artefact_model="fbcnn", inpaint_model="lama"))
    assert stage.models() == ["fbcnn", "lama"]


def test_an_inpainter_that_is_no_inpainting_model_is_refused(tmp_path, ctx):
    weights = tiny_dncnn(tmp_path / "dncnn.pth")
    image = clean_image("Set5/HR/baby.png")
    damaged, _ = draw_defects(image.pixels, 1, scratches=1, specks=2, plain_only=True)
    with pytest.raises(StageError, match="not an inpainting model"):
        run(image.replace(pixels=damaged), ctx, colour=False, inpaint_model=str(weights))


@pytest.mark.slow
def test_lama_inpaints_through_the_store_and_records_its_hash(tmp_path, ctx):
    """LaMa at its real size, randomly initialised: it fills exactly the masked pixels."""
    weights = random_lama(tmp_path / "big-lama.pth")
    image = clean_image("Set5/HR/baby.png")
    crop = np.ascontiguousarray(image.pixels[300:420, 20:140])
    damaged, _ = draw_defects(crop, 2, scratches=1, specks=3, plain_only=True)
    result = run(image.replace(pixels=damaged), ctx, colour=False, inpaint_model=str(weights))
    dust = json.loads(json.dumps(result.params))["dust"]
    assert dust["inpaint"] == "model" and dust["inpaint_architecture"] == "LaMa"
    assert dust["inpaint_model_sha256"] == sha256_file(weights)
    untouched = result.mask == 0
    np.testing.assert_array_equal(result.image.pixels[untouched], damaged[untouched])
    assert not np.array_equal(result.image.pixels[~untouched], damaged[~untouched])
    with pytest.raises(StageError, match="not a 1x restoration model"):
        run(image.replace(pixels=damaged), ctx, artefact_model=str(weights))


# --- the learned detector (DefectUNet), random weights of the real architecture -------------


@pytest.mark.parametrize("colour", [False, True], ids=["luma", "colour"])
def test_the_learned_detector_runs_tiled_through_the_store_and_records_its_hash(
    tmp_path, ctx, colour
):
    weights = random_defectunet(tmp_path / "defects.safetensors", colour=colour)
    image = clean_image("Set5/HR/baby.png")
    crop = image.replace(pixels=np.ascontiguousarray(image.pixels[100:260, 50:250]))
    options = {"colour": False, "detector": "learned", "detector_model": str(weights)}
    # A random network's probabilities sit near 0.5: cut low so that it marks something.
    tiled = run(crop, ctx, tile=64, threshold=0.05, **options)
    whole = run(crop, ctx, tile=0, threshold=0.05, **options)
    dust = json.loads(json.dumps(tiled.params))["dust"]
    assert dust["detector"] == "learned" and dust["detector_architecture"] == "DefectUNet"
    assert dust["detector_model_sha256"] == sha256_file(weights)
    assert dust["tiles"] > 1 and whole.params["dust"]["tiles"] == 1
    assert tiled.mask is not None and tiled.mask.shape == crop.pixels.shape[:2]
    assert dust["repaired_pixels"] == np.count_nonzero(tiled.mask) > 0
    np.testing.assert_array_equal(tiled.mask, whole.mask)  # tiles agree with the whole image
    untouched = tiled.mask == 0
    np.testing.assert_array_equal(tiled.image.pixels[untouched], crop.pixels[untouched])


@pytest.mark.parametrize("colour", [False, True], ids=["luma", "colour"])
def test_the_learned_detector_runs_on_openvino_and_auto_records_its_measured_choice(
    tmp_path, ctx, colour
):
    weights = random_defectunet(tmp_path / "defects.safetensors", colour=colour)
    image = clean_image("Set5/HR/baby.png")
    crop = image.replace(pixels=np.ascontiguousarray(image.pixels[100:260, 50:250]))
    options = {"colour": False, "detector": "learned", "detector_model": str(weights)}
    on_torch = run(crop, ctx, tile=64, threshold=0.05, **options)
    vino = run(crop, ctx, tile=64, threshold=0.05, engine="openvino", **options)
    auto = run(crop, ctx, tile=64, threshold=0.05, engine="auto", **options)
    dust = json.loads(json.dumps(vino.params))["dust"]
    assert dust["detector_engine"] == "openvino" and on_torch.params["dust"]["detector_engine"] == (
        "torch"
    )
    assert set(dust["detector_converted_sha256"]) == {"model.xml", "model.bin"}
    # Probabilities agree to fp32 rounding: at most a pixel or two sits on the threshold.
    assert np.count_nonzero(vino.mask != on_torch.mask) <= 2 < np.count_nonzero(on_torch.mask)
    calibration = auto.params["dust"]["detector_engine_calibration"]
    measured = {m["engine"]: m for m in calibration["measurements"]}
    assert {"torch", "openvino"} <= set(measured) and measured[calibration["choice"]]["passed"]
    assert calibration["tile"] == [64 + 32, 64 + 32]  # a tile as cut: 64 px and the overlap
    assert np.count_nonzero(auto.mask != on_torch.mask) <= 2


@pytest.mark.parametrize("colour", [False, True], ids=["luma-net", "colour-net"])
@pytest.mark.parametrize(
    ("relative", "bits"), [("Set14/HR/bridge.png", 8), ("Set5/HR/head.png", 16)]
)
def test_the_learned_path_keeps_greyscale_and_16_bit(tmp_path, ctx, relative, bits, colour):
    weights = random_defectunet(tmp_path / "defects.safetensors", colour=colour)
    image = clean_image(relative)
    pixels = np.ascontiguousarray(image.pixels[:96, :128])
    if bits == 16:  # true 16-bit levels: a gentle ramp of less than one 8-bit step
        ramp = np.linspace(0, 1 / 255, pixels.shape[1], dtype=np.float32)[None, :, None]
        pixels = (np.rint(np.clip(pixels + ramp, 0, 1) * 65535) / 65535).astype(np.float32)
    source = image.replace(pixels=pixels, bit_depth=bits)
    result = run(
        source, ctx, colour=False, detector="learned", detector_model=str(weights), threshold=0.05
    )
    out = result.image
    assert out.pixels.shape == pixels.shape and out.bit_depth == bits
    assert out.pixels.dtype == np.float32 and result.mask is not None
    if bits == 16:  # nothing is quantised to 8-bit levels on the way
        assert len(np.unique(np.rint(out.pixels * 65535) % 257)) > 100


def test_a_colour_defectunet_sees_a_neutral_speck_pull_chroma_and_a_grey_scan_has_none():
    """The colour network's extra evidence: a neutral speck on a coloured place departs from
    its surroundings' chroma, a speck of the place's own hue does not, a grey scan has no
    chroma at all; luma and colour weights load as what they are."""
    import torch

    from pipeline.models.defectnet import (
        CHROMA_FEATURES,
        FEATURES,
        DefectUNet,
        chroma_features,
        defect_descriptor,
    )

    place = torch.tensor([0.8, 0.3, 0.2]).view(1, 3, 1, 1).expand(1, 3, 32, 32).clone()
    neutral, own_hue = place.clone(), place.clone()
    neutral[..., 14:18, 14:18] = 0.95  # white dust
    own_hue[..., 14:18, 14:18] = place[..., :1, :1] * 1.2  # a brighter patch of the same hue

    def departure(rgb: torch.Tensor) -> float:
        y = rgb[:, 0:1] * 0.299 + rgb[:, 1:2] * 0.587 + rgb[:, 2:3] * 0.114
        return float(chroma_features(rgb, y)[0, 2:, 14:18, 14:18].abs().mean())

    assert departure(neutral) > 4 * departure(own_hue) > 0
    grey = torch.rand(1, 1, 32, 32).expand(1, 3, 32, 32)
    assert not chroma_features(grey, grey[:, :1]).any()
    for colour in (False, True):
        state = DefectUNet(4, colour).state_dict()
        loaded = defect_descriptor(state)
        assert loaded.model.colour is colour and loaded.input_channels == (3 if colour else 1)
        first = state["enc.0.0.weight"].shape[1]
        assert first == FEATURES + (CHROMA_FEATURES if colour else 0)


def test_a_sure_detection_extends_along_its_faint_connected_end_but_a_faint_blob_stays_out():
    probability = np.zeros((40, 60), np.float32)
    probability[10, 5:30] = 0.9  # a scratch the network is sure of
    probability[10, 30:45] = 0.3  # its faint end, connected: within reach, then cut off
    probability[30, 20:23] = 0.3  # as faint, but nothing sure touches it
    mask = mask_from_probability(probability, threshold=0.5) > 0
    assert mask[10, 5:32].all() and not mask[10, 34:].any()  # reach 2, grown by 1
    assert mask[9:12, 10].all() and not mask[8, 10]  # the growth covers the fringe, 1 px
    assert not mask[25:, :].any()
    assert not mask_from_probability(np.full((8, 8), 0.4, np.float32), 0.5).any()


def test_a_detector_that_is_no_defectunet_is_refused(tmp_path, ctx):
    weights = tiny_dncnn(tmp_path / "dncnn.pth", channels=1)
    image = clean_image("Set14/HR/bridge.png")
    with pytest.raises(StageError, match="not a DefectUNet"):
        run(image, ctx, colour=False, detector="learned", detector_model=str(weights))


def test_models_lists_the_learned_detector_only_when_it_runs():
    learned = {"detector": "learned", "detector_model": "defects-v0"}
    assert RestoreStage(RestoreOptions(**learned)).models() == ["defects-v0"]
    assert RestoreStage(RestoreOptions(detector="classic")).models() == []
    assert RestoreStage(RestoreOptions(**learned, dust=False)).models() == []


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"colour": False, "dust": False}, "restore does nothing"),
        ({"dust": False, "inpaint_model": "lama"}, "inpaint_model: only used when dust"),
        ({"low_percentile": 60}, "less than 50"),
        ({"low_percentile": 10, "high_percentile": 60}, None),
        ({"sensitivity": 1.5}, "less than or equal to 1"),
        ({"max_defect_px": 1}, "greater than or equal to 2"),
        ({"detector": "unet"}, "Input should be 'learned' or 'classic'"),
        ({"threshold": 1.0}, "less than 1"),
        ({"detector": "learned"}, "detector_model: required by the learned detector"),
        ({"inpaint": "lama"}, "Input should be 'telea' or 'ns'"),
        ({"tile": 8}, "tile: must be 0"),
        ({"tile": 64, "overlap": 65}, "overlap: must not exceed the tile"),
        ({"brightness": 1}, "Extra inputs are not permitted"),
    ],
)
def test_options_are_validated(options, message):
    if message is None:
        assert RestoreOptions(**options).high_percentile == 60
        return
    with pytest.raises(ValidationError, match=message):
        RestoreOptions(**options)


def test_a_bad_option_is_reported_with_its_key_path_in_a_chain():
    with pytest.raises(ChainConfigError) as caught:
        build_chain([{"kind": "restore", "dust": False, "inpaint_model": "lama"}])
    assert caught.value.problems == [
        "pipeline.stages[0].inpaint_model: only used when dust is true"
    ]


def test_corpus_holds_the_images_these_tests_use():
    """CLEAN is the whole of Set5 and Set14 HR: none is left out of the 40 dB check."""
    shared_file("corpus/sr_benchmark/Set5/HR/baby.png")
    for folder, names in (("Set5", SET5), ("Set14", SET14)):
        found = sorted(path.stem for path in (CORPUS / "sr_benchmark" / folder / "HR").glob("*"))
        assert found == sorted(names)
