"""Procedural damage for training the defect detector (training/damage.py): seeded, drawn on
real clean photos, with the mask of what the defects moved as the target, and only images
the project may train on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, shared_file

from pipeline.image import decode
from training import damage as dmg


def clean_crop() -> np.ndarray:
    pixels = decode(shared_file("corpus/sr_benchmark/skimage_cc0_HR/chelsea.png")).pixels
    return np.ascontiguousarray(pixels[50:178, 100:228, :3])


def test_the_same_seed_draws_the_same_damage_and_another_seed_other_damage():
    clean = clean_crop()
    first = dmg.damage(clean, np.random.default_rng(7))
    again = dmg.damage(clean, np.random.default_rng(7))
    other = dmg.damage(clean, np.random.default_rng(8))
    np.testing.assert_array_equal(first.pixels, again.pixels)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert not np.array_equal(first.mask, other.mask)
    assert first.pixels.shape == (128, 128, 3) and first.pixels.dtype == np.float32
    assert first.mask.shape == (128, 128) and set(np.unique(first.mask)) <= {0.0, 1.0}
    assert first.pixels.min() >= 0 and first.pixels.max() <= 1


def test_a_grey_original_stays_grey_through_damage_and_degradations_and_colour_stays_colour():
    """The colour network learns that a grey scan has no chroma to go by: grain, noise and
    JPEG never put colour into a grey crop, while a colour crop keeps its chroma."""
    clean = clean_crop()
    grey = np.repeat(clean @ np.array([0.299, 0.587, 0.114], np.float32)[:, None], 3, 1)
    grey = grey.reshape(clean.shape)
    for seed in range(6):
        hurt = dmg.damage(grey, np.random.default_rng(seed), amount=2.0)
        assert hurt.mask.any()
        np.testing.assert_array_equal(hurt.pixels[:, :, 0], hurt.pixels[:, :, 2])
    chroma = [
        np.abs(np.diff(dmg.damage(clean, np.random.default_rng(s)).pixels, axis=2)).mean()
        for s in range(6)
    ]
    assert max(chroma) > 0.02  # chelsea is a ginger cat: untoned crops keep their colour


def test_the_mask_is_exactly_where_the_defects_moved_pixels_visibly():
    clean = clean_crop()
    damaged, moved = dmg.draw_defects(clean, np.random.default_rng(3), amount=3.0)
    np.testing.assert_allclose(moved, np.abs(damaged - clean).max(axis=2), atol=1e-6)
    target = moved >= dmg.COVER
    assert 0.001 < target.mean() < 0.5
    # Outside the target the picture is as it was (to within the threshold).
    assert np.abs(damaged - clean)[~target].max() < dmg.COVER


def test_every_kind_of_defect_is_drawn_bright_or_dark_and_thin_or_wide():
    clean = np.full((160, 160, 3), 0.5, np.float32)  # plain grey: every defect is visible
    rng = np.random.default_rng(0)
    for kind, draw in dmg._DRAW.items():
        layer = np.zeros((160, 160), np.uint8)
        for _ in range(5):
            draw(layer, rng)
        assert np.count_nonzero(layer) > 20, kind
    damaged, moved = dmg.draw_defects(clean, np.random.default_rng(1), amount=4.0)
    values = damaged[moved >= dmg.COVER]
    assert (values > 0.8).any() and (values < 0.2).any()  # both polarities


def test_amount_zero_draws_nothing():
    clean = clean_crop()
    damaged, moved = dmg.draw_defects(clean, np.random.default_rng(5), amount=0.0)
    assert not moved.any()
    np.testing.assert_array_equal(damaged, clean)


def test_training_images_are_only_the_allowed_ones():
    shared_file("corpus/sr_benchmark/McMaster/HR")
    paths = dmg.training_images(CORPUS)
    assert paths, "no training images found"
    names = {p.name for p in paths}
    assert {"astronaut.png", "camera.png"} <= names
    assert any(p.parent.name == "HR" and p.parent.parent.name == "McMaster" for p in paths)
    for path in paths:
        lowered = str(path).lower()
        assert "set5" not in lowered and "set14" not in lowered and "holdout" not in lowered
        assert path.is_file()


def test_a_forbidden_folder_is_refused(tmp_path, monkeypatch):
    forbidden = tmp_path / "Set14" / "sr_benchmark" / "McMaster" / "HR"
    forbidden.mkdir(parents=True)
    (forbidden / "x.tif").write_bytes(b"")
    with pytest.raises(ValueError, match="not allowed as training data"):
        dmg.training_images(Path(tmp_path / "Set14"))


def test_graphics_are_drawn_seeded_and_are_never_the_target():
    photo = clean_crop()
    page = dmg.graphics(128, np.random.default_rng(11), photo=photo)
    again = dmg.graphics(128, np.random.default_rng(11), photo=photo)
    np.testing.assert_array_equal(page, again)
    assert page.shape == (128, 128, 3) and page.dtype == np.float32
    assert page.min() >= 0 and page.max() <= 1
    # Text, rules and outlines are drawn: the page has sharp strokes, not a flat fill.
    luma = page @ np.array([0.299, 0.587, 0.114], np.float32)
    assert np.abs(np.diff(luma, axis=1)).max() > 0.3
    # They are content to leave alone: undamaged, the target is empty.
    assert not dmg.damage(page, np.random.default_rng(2), amount=0.0).mask.any()
    hurt = dmg.damage(page, np.random.default_rng(2), amount=3.0)
    assert 0 < hurt.mask.mean() < 0.5


def test_the_training_target_is_the_visible_core_and_the_faint_skirt_costs_nothing():
    """The loss learns the defects' clearly visible cores; the skirt a defect moved by less than
    CORE (often hidden under grain) and the ring around the cores are left out of the loss,
    while a detection on undamaged picture still costs."""
    import torch

    from training.train_defects import CORE, loss_fn, target_and_care

    coverage = torch.zeros(1, 1, 40, 40)
    coverage[..., 10:13, 5:25] = 0.5  # a scratch's core
    coverage[..., 9, 5:25] = (dmg.COVER + CORE) / 2  # its faint skirt: damage, but not the target
    coverage[..., 30, 5:25] = dmg.COVER / 2  # moved by less than COVER: not damage at all
    target, care = target_and_care(coverage)
    assert target[..., 10:13, 5:25].all() and target.sum() == 60
    assert not care[..., 8:10, 5:25].any() and not care[..., 13:15, 5:25].any()  # skirt, ring
    assert care[..., 16:, :].all() and care[..., 10:13, 5:25].all()
    right = torch.where(target > 0, 6.0, -6.0)  # sure of the core, sure of the rest
    on_skirt, on_picture = right.clone(), right.clone()
    on_skirt[..., 8:10, 5:25] = 6.0  # also fires on the skirt and the ring
    on_picture[..., 30, 5:25] = 6.0  # fires on undamaged picture
    assert loss_fn(on_skirt, coverage) == pytest.approx(loss_fn(right, coverage).item())
    assert loss_fn(on_picture, coverage) > loss_fn(right, coverage) + 0.1


def test_a_crop_centred_on_a_hard_negative_contains_it_and_mining_finds_what_the_model_marks():
    """Fine-tuning on hard negatives: a crop asked for around a point holds that point, and the
    miner returns the places a network marks on undamaged images (none where it marks nothing)."""
    import torch

    from pipeline.models.defectnet import DefectUNet
    from training.train_defects import crop, mine_hard_negatives

    image = np.zeros((300, 400, 3), np.float32)
    image[200:204, 300:304] = 1.0  # the one bright mark
    for seed in range(8):
        out = crop(image, 96, np.random.default_rng(seed), centre=(202, 302))
        assert out.shape == (96, 96, 3) and out.max() > 0.5
    model = DefectUNet(4, colour=True)
    with torch.no_grad():
        model.defectunet.head.bias.fill_(-30.0)  # sure that nothing is damage
    assert mine_hard_negatives(model, [image]) == []
    with torch.no_grad():  # probability 0.5 everywhere: the whole picture is one detection
        model.defectunet.head.weight.zero_()
        model.defectunet.head.bias.zero_()
    marked = mine_hard_negatives(model, [image, image[:, :, :1]], threshold=0.4)
    # The colour image as it is and as grey, the grey image once: each marked whole, at its centre.
    assert marked == [(0, 149, 199), (0, 149, 199), (1, 149, 199)]


def test_the_graphics_share_is_an_option_recorded_in_the_card_and_checked(tmp_path):
    """`--graphics-share` sets how many training crops are drawn pages (the dark lines that are
    content): a two-step run records it in its card; a share outside 0..1 is refused."""
    import json

    from training.train_defects import main

    shared_file("corpus/sr_benchmark/McMaster")
    out = tmp_path / "run"
    argv = ["--steps", "2", "--every", "2", "--batch", "2", "--size", "64"]
    assert main([*argv, "--graphics-share", "0", "--precision", "fp32", "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["graphics_share"] == 0.0 and card["data"]["graphics"].startswith("0% of crops")
    assert card["steps"] == 2 and (out / "defectunet.safetensors").is_file()
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--graphics-share", "1.5", "--out", str(out)])
    assert refused.value.code == 2
