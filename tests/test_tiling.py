"""Tiled inference: coverage, seamless blending, disk-backed outputs, OOM retry, real weights."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import shared_file
from modelfactory import tiny_compact, tiny_rrdbnet

from pipeline.errors import StageError
from pipeline.models import ModelStore
from pipeline.tiling import (
    Engine,
    TileSettings,
    auto_overlap,
    overlap_for,
    resolve_device,
    resolve_precision,
    run_tiled,
    tile_span,
    tile_starts,
)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR after 8-bit rounding, as the targets are stated."""
    a8, b8 = np.rint(a * 255), np.rint(b * 255)
    mse = float(np.mean((a8 - b8) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def engine_for(path, tmp_path, precision="fp32") -> Engine:
    loaded = ModelStore(tmp_path / "cache").load(str(path))
    return Engine(loaded.descriptor, device="cpu", precision=precision)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.random((height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    import cv2

    base = cv2.resize(smooth, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(base + 0.05 * rng.standard_normal((height, width, 3)), 0, 1).astype(np.float32)


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(300, 256, 64), (400, 256, 128), (1000, 256, 96), (97, 32, 8), (256, 256, 16), (10, 256, 16)],
)
def test_tile_starts_cover_the_length_with_at_least_the_overlap(length, tile, overlap):
    for size in (min(tile, length), tile_span(length, tile, overlap)):
        starts = tile_starts(length, size, overlap)
        assert starts[0] == 0
        assert starts[-1] + size == length
        for a, b in itertools.pairwise(starts):
            assert a + size - b >= overlap  # neighbours share at least the overlap
            assert b > a


@pytest.mark.parametrize("length", [*range(200, 1400, 7), 3000, 4000])
def test_tiles_are_shrunk_to_share_the_overlap_and_not_much_more(length):
    """tile_span keeps the count of full-size tiles and the overlap, and cuts what full-size
    tiles would share beyond it (448 px at tile 336, overlap 80: 264 px tiles, not 336)."""
    tile, overlap = 336, 80
    full = tile_starts(length, tile, overlap)
    size = tile_span(length, tile, overlap)
    starts = tile_starts(length, size, overlap)
    assert size <= tile and len(starts) == len(full)
    if length <= tile:
        assert starts == [0] and size == length
        return
    shared = [a + size - b for a, b in itertools.pairwise(starts)]
    assert min(shared) >= overlap and max(shared) <= overlap + len(starts)  # rounding only
    if length == 448:
        assert size == 264


def test_reduced_precision_engines_get_the_wider_overlap_their_budget_needs(tmp_path):
    """x4plus's seams agree at 53 dB with 80 px; a bf16/fp16 engine spends part of the 50 dB
    budget itself, so its tiles share 96. The compact model's 24 px leaves room for both."""
    rrdb = engine_for(tiny_rrdbnet(tmp_path / "r.pth"), tmp_path)
    compact = engine_for(tiny_compact(tmp_path / "c.pth"), tmp_path)
    assert auto_overlap(rrdb.descriptor) == overlap_for(rrdb, "auto") == 80
    assert auto_overlap(rrdb.descriptor, "bf16") == auto_overlap(rrdb.descriptor, "fp16") == 96
    assert auto_overlap(compact.descriptor) == auto_overlap(compact.descriptor, "bf16") == 24
    assert overlap_for(rrdb, 12) == 12  # a number in the config is taken as it is


def test_tiled_output_equals_whole_image_for_a_model_with_small_receptive_field(tmp_path):
    # Two 3x3 convs see 2 px around each pixel: with 16 px of overlap, tiling must be exact
    # up to float summation order, which proves the blend weights are seamless.
    engine = engine_for(tiny_compact(tmp_path / "c.pth", num_conv=1), tmp_path)
    image = random_image(150, 205)
    whole = run_tiled(engine, image, TileSettings(tile=0)).pixels
    for tile in (48, 64, 100):
        tiled = run_tiled(engine, image, TileSettings(tile=tile, overlap=16)).pixels
        assert tiled.shape == (600, 820, 3)
        np.testing.assert_allclose(tiled, whole, atol=2e-5)


def test_batched_tiles_give_the_same_output_as_single_tiles(tmp_path):
    engine = engine_for(tiny_rrdbnet(tmp_path / "r.pth", scale=2), tmp_path)
    image = random_image(90, 130)
    one = run_tiled(engine, image, TileSettings(tile=48, overlap=8, batch=1)).pixels
    four = run_tiled(engine, image, TileSettings(tile=48, overlap=8, batch=4)).pixels
    np.testing.assert_allclose(one, four, atol=1e-5)


def test_large_output_goes_to_a_disk_backed_buffer_with_the_same_pixels(tmp_path):
    engine = engine_for(tiny_compact(tmp_path / "c.pth", num_conv=1), tmp_path)
    image = random_image(120, 90)
    in_ram = run_tiled(engine, image, TileSettings(tile=40, overlap=8)).pixels
    on_disk = run_tiled(
        engine, image, TileSettings(tile=40, overlap=8, max_bytes_in_ram=1024, scratch_dir=tmp_path)
    ).pixels
    assert isinstance(on_disk, np.memmap)
    assert not isinstance(in_ram, np.memmap)
    np.testing.assert_array_equal(np.asarray(on_disk), in_ram)
    assert not list(tmp_path.glob(".scanrestore-buf-*"))  # the backing file is unlinked


def test_progress_reports_every_tile(tmp_path):
    engine = engine_for(tiny_compact(tmp_path / "c.pth", num_conv=1), tmp_path)
    seen = []
    result = run_tiled(
        engine,
        random_image(100, 100),
        TileSettings(tile=40, overlap=8),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen[-1] == (result.tiles, result.tiles)
    assert [done for done, _ in seen] == list(range(1, result.tiles + 1))


class _OomOverTile(Engine):
    """An engine that behaves like a GPU with room for tiles up to `limit` pixels a side."""

    limit = 48  # a 32 px tile plus its 16 px overlap

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        if max(batch.shape[-2:]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().infer(batch)


def test_out_of_memory_halves_the_tile_and_retries(tmp_path):
    loaded = ModelStore(tmp_path / "cache").load(str(tiny_compact(tmp_path / "c.pth", num_conv=1)))
    engine = _OomOverTile(loaded.descriptor, device="cpu", precision="fp32")
    image = random_image(100, 120)
    result = run_tiled(engine, image, TileSettings(tile=128, overlap=16))
    assert result.tile == 32
    reference = Engine(loaded.descriptor, device="cpu", precision="fp32")
    np.testing.assert_allclose(
        result.pixels, run_tiled(reference, image, TileSettings(tile=0)).pixels, atol=2e-5
    )


def test_out_of_memory_below_the_minimum_tile_is_raised(tmp_path):
    loaded = ModelStore(tmp_path / "cache").load(str(tiny_compact(tmp_path / "c.pth")))
    engine = _OomOverTile(loaded.descriptor, device="cpu", precision="fp32")
    engine.limit = 8
    with pytest.raises(torch.OutOfMemoryError):
        run_tiled(engine, random_image(100, 100), TileSettings(tile=64, overlap=8))


@pytest.mark.parametrize("failure", ["nan", "black"])
def test_a_broken_fp16_tile_is_run_again_in_fp32(tmp_path, failure):
    # The GPU is mocked: the fp16 model runs on the CPU, and its output is broken on the tiles
    # the way half overflow breaks them (NaN, or black) while the fp32 copy runs for real.
    path = tiny_compact(tmp_path / "c.pth", num_conv=1)
    store = ModelStore(tmp_path / "cache")
    half = store.load(str(path), dtype=torch.float16).descriptor
    exact = store.load(str(path)).descriptor
    engine = Engine(half, device="cpu", precision="fp16", fp32_descriptor=exact)
    calls = []

    def call(module, image):
        calls.append(image.dtype)
        if image.dtype == torch.float32:
            return module(image)
        out = torch.zeros(*image.shape[:2], image.shape[2] * 4, image.shape[3] * 4)
        return out.fill_(math.nan) if failure == "nan" else out

    engine._call_fn = call
    image = random_image(48, 64)
    result = run_tiled(engine, image, TileSettings(tile=32, overlap=8))
    assert calls == [torch.float16, torch.float32] * result.tiles
    assert engine.fp32_fallbacks == result.tiles
    reference = engine_for(path, tmp_path)
    expected = run_tiled(reference, image, TileSettings(tile=32, overlap=8)).pixels
    np.testing.assert_allclose(result.pixels, expected, atol=1e-6)


def test_auto_precision_is_exact_fp32_on_a_cpu_with_or_without_native_bf16(tmp_path, monkeypatch):
    import pipeline.tiling as tiling

    loaded = ModelStore(tmp_path / "cache").load(str(tiny_compact(tmp_path / "c.pth")))
    monkeypatch.setattr(tiling, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", "cpu", loaded.descriptor) == "fp32"
    monkeypatch.setattr(tiling, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", "cpu", loaded.descriptor) == "fp32"
    assert resolve_precision("bf16", "cpu", loaded.descriptor) == "bf16"  # only when asked
    assert resolve_precision("auto", "cuda", loaded.descriptor) == "fp16"
    with pytest.raises(StageError, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", "cpu", loaded.descriptor)


def test_an_unknown_device_is_refused():
    with pytest.raises(StageError, match="device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("photo", "crop", "tile"),
    [
        ("corpus/sr_benchmark/Set14/HR/baboon.png", (260, 300), 128),
        ("corpus/old_photos/historic/bop_old_b.png", (250, 290), 160),
    ],
)
def test_real_x4plus_tiled_agrees_with_whole_image_at_50_db(tmp_path, photo, crop, tile):
    """Real weights on real photos, tiles that do not divide them, automatic overlap."""
    import cv2

    weights = shared_file("weights/RealESRGAN_x4plus.from-ncnn.pth")
    bgr = cv2.imread(str(shared_file(photo)), cv2.IMREAD_COLOR)
    image = np.ascontiguousarray(bgr[: crop[0], : crop[1], ::-1].astype(np.float32) / 255)
    engine = engine_for(weights, tmp_path)
    whole = run_tiled(engine, image, TileSettings(tile=0)).pixels
    tiled = run_tiled(
        engine, image, TileSettings(tile=tile, overlap=auto_overlap(engine.descriptor))
    )
    assert crop[0] % tile and crop[1] % tile and tiled.tiles == 4
    assert psnr(tiled.pixels, whole) >= 50.0


def test_a_banded_copy_is_exact_in_ram_and_on_disk_and_broadcasts_grey_to_rgb(tmp_path):
    """pipeline.buffers.copy, which the restore and face stages copy scans with: the same
    values whether the copy stays in RAM or goes to a disk-backed buffer, and a grey plane
    repeated into three channels when asked."""
    from pipeline import buffers

    rng = np.random.default_rng(0)
    grey = rng.random((70, 9, 1), dtype=np.float32)
    in_ram = buffers.copy(grey, max_bytes_in_ram=1 << 20, scratch_dir=tmp_path, band_rows=16)
    on_disk = buffers.copy(grey, max_bytes_in_ram=0, scratch_dir=tmp_path, band_rows=16)
    assert not isinstance(in_ram, np.memmap) and isinstance(on_disk, np.memmap)
    np.testing.assert_array_equal(in_ram, grey)
    np.testing.assert_array_equal(on_disk, grey)
    rgb = buffers.copy(grey, channels=3, max_bytes_in_ram=0, scratch_dir=tmp_path, band_rows=16)
    assert rgb.shape == (70, 9, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], grey[:, :, 0])
