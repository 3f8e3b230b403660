"""Inference engines: the ncnn writer and OpenVINO's converter agree with torch for every
registered upscale architecture, converted models are cached and hash-checked, `auto` calibrates,
picks, caches and records its choice, and a model an engine cannot convert falls back to torch
with the reason."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import shared_file
from modelfactory import tiny_compact, tiny_dncnn, tiny_rrdbnet

import pipeline.runtimes.ncnn as ncnn_runtime
import pipeline.runtimes.openvino as openvino_runtime
from pipeline.errors import HashMismatchError
from pipeline.image import Image, Metadata
from pipeline.models import ModelStore
from pipeline.models.registry import REGISTRY
from pipeline.runtimes import MIN_AGREEMENT_DB, psnr8
from pipeline.runtimes.ncnn import NcnnEngine, convert_ncnn
from pipeline.runtimes.ncnn_writer import Unconvertible
from pipeline.runtimes.openvino import OpenVinoEngine, convert_openvino
from pipeline.stage import StageContext
from pipeline.stages.upscale import UpscaleOptions, UpscaleStage
from pipeline.tiling import Engine

pytest.importorskip("ncnn")

BUILDERS = {"ESRGAN": tiny_rrdbnet, "Compact": tiny_compact}
# RRDBNet below x4 pixel-unshuffles its input (reflect-padded first): not written yet.
UNCONVERTIBLE = {("ESRGAN", 2)}
# What `auto` may time: ncnn at the torch threads and at one, openvino, and bf16 twins where the
# CPU has native bf16 kernels.
AUTO_CANDIDATES = {"torch", "ncnn", "ncnn@1", "openvino", "torch-bf16", "openvino-bf16"}


def _descriptor(path):
    import spandrel

    state = torch.load(path, weights_only=True)
    return spandrel.ModelLoader("cpu").load_from_state_dict(state).eval()


def _photo(height: int, width: int) -> np.ndarray:
    bgr = cv2.imread(str(shared_file("corpus/old_photos/historic/bop_old_a.png")))
    top, left = (bgr.shape[0] - height) // 2, (bgr.shape[1] - width) // 2
    crop = bgr[top : top + height, left : left + width, ::-1]
    return np.ascontiguousarray(crop, dtype=np.float32) / 255.0


def _image(pixels: np.ndarray) -> Image:
    return Image(pixels=pixels, alpha=None, bit_depth=8, format="png", metadata=Metadata())


@pytest.fixture
def ctx(tmp_path) -> StageContext:
    return StageContext(models=ModelStore(tmp_path / "cache"), device="cpu", precision="fp32")


def _registered_upscalers() -> list[tuple[str, int]]:
    found = sorted({(s.architecture, s.scale) for s in REGISTRY.values() if s.purpose == "upscale"})
    assert found, "the registry lists no upscale models"
    return found


@pytest.mark.parametrize(("architecture", "scale"), _registered_upscalers())
def test_ncnn_conversion_of_every_registered_upscaler_agrees_with_torch(
    tmp_path, architecture, scale
):
    descriptor = _descriptor(BUILDERS[architecture](tmp_path / "m.pth", scale=scale))
    if (architecture, scale) in UNCONVERTIBLE:
        with pytest.raises(Unconvertible):
            convert_ncnn(descriptor, "0" * 64, tmp_path / "cache")
        return
    files = convert_ncnn(descriptor, "0" * 64, tmp_path / "cache")
    batch = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(1))
    expected = Engine(descriptor, device="cpu", precision="fp32").infer(batch).numpy()
    actual = NcnnEngine(descriptor, files, threads=1).infer(batch).numpy()
    assert actual.shape == expected.shape == (1, 3, 24 * scale, 32 * scale)
    assert np.abs(actual - expected).max() < 1e-4
    assert psnr8(actual, expected) >= MIN_AGREEMENT_DB


def test_an_upsampling_tail_run_band_by_band_gives_the_whole_calls_output(tmp_path, monkeypatch):
    import pipeline.runtimes.ncnn as ncnn_engine

    descriptor = _descriptor(tiny_rrdbnet(tmp_path / "m.pth"))
    files = convert_ncnn(descriptor, "3" * 64, tmp_path / "cache")
    engine = NcnnEngine(descriptor, files, threads=1)
    assert engine.tail is not None and engine.tail.scale == 4 and engine.tail.halo == 3
    batch = torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(2))
    whole = engine.infer(batch)
    bands = []
    original = engine._extract

    def extract(name, pixels, blob):
        bands.append((name, pixels.shape))
        return original(name, pixels, blob)

    monkeypatch.setattr(ncnn_engine, "BAND_PIXELS", 36 * 8)
    monkeypatch.setattr(engine, "_extract", extract)
    banded = engine.infer(batch)
    assert [name for name, _ in bands] == ["in0"] + [engine.tail.blob] * 5  # 8-row bands
    assert bands[1][1] == (8, 8 + 3, 36)  # the first band reads 3 rows of its neighbour
    assert torch.equal(banded, whole)
    reference = Engine(descriptor, device="cpu", precision="fp32").infer(batch)
    assert (banded - reference).abs().max() < 1e-4
    # Compact adds the upsampled input image at its end: its tail is not cut off the body.
    compact = _descriptor(tiny_compact(tmp_path / "c.pth"))
    compact_files = convert_ncnn(compact, "4" * 64, tmp_path / "c")
    assert NcnnEngine(compact, compact_files, threads=1).tail is None


def test_a_model_spandrel_calls_with_extra_inputs_is_not_converted(tmp_path):
    # spandrel calls DnCNN through its own function (a noise map for the FDnCNN variants):
    # writing only the module would run a different computation.
    descriptor = _descriptor(tiny_dncnn(tmp_path / "dncnn.pth"))
    with pytest.raises(Unconvertible, match="not called as image -> image"):
        convert_ncnn(descriptor, "1" * 64, tmp_path / "cache")


@pytest.mark.parametrize("convert", [convert_ncnn, convert_openvino], ids=["ncnn", "openvino"])
def test_converted_model_is_reused_from_the_cache_and_refused_when_tampered(tmp_path, convert):
    descriptor = _descriptor(tiny_compact(tmp_path / "m.pth"))
    first = convert(descriptor, "2" * 64, tmp_path / "cache")
    again = convert(descriptor, "2" * 64, tmp_path / "cache")
    assert first.converted and not again.converted
    assert again.sha256 == first.sha256 and again.folder == first.folder
    weights = first.folder / "model.bin"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError, match=r"model\.bin"):
        convert(descriptor, "2" * 64, tmp_path / "cache")


@pytest.mark.parametrize(("architecture", "scale"), _registered_upscalers())
def test_openvino_conversion_of_every_registered_upscaler_keeps_fp32_and_agrees_with_torch(
    tmp_path, architecture, scale
):
    descriptor = _descriptor(BUILDERS[architecture](tmp_path / "m.pth", scale=scale))
    files = convert_openvino(descriptor, "0" * 64, tmp_path / "cache")
    # OpenVINO's save_model halves weights to fp16 by default: exact mode stores them as fp32.
    parameters = sum(p.numel() for p in descriptor.model.parameters())
    assert len(files.files["model.bin"]) >= 4 * parameters
    batch = torch.rand(1, 3, 37, 45, generator=torch.Generator().manual_seed(1))
    expected = Engine(descriptor, device="cpu", precision="fp32").infer(batch).numpy()
    actual = OpenVinoEngine(descriptor, files, threads=1).infer(batch).numpy()
    assert actual.shape == expected.shape == (1, 3, 37 * scale, 45 * scale)
    assert np.abs(actual - expected).max() < 1e-4


def test_unconvertible_model_falls_back_to_torch_with_the_reason(tmp_path, ctx):
    model = tiny_rrdbnet(tmp_path / "x2.pth", scale=2)
    pixels = np.random.default_rng(0).random((24, 32, 3), dtype=np.float32)
    options = {"model": str(model), "scale": 2, "tile": 0}
    ncnn = UpscaleStage(UpscaleOptions(engine="ncnn", **options)).run(_image(pixels), ctx)
    plain = UpscaleStage(UpscaleOptions(engine="torch", **options)).run(_image(pixels), ctx)
    assert ncnn.params["engine"] == "torch"
    assert ncnn.params["engine_requested"] == "ncnn"
    assert "Unconvertible" in ncnn.params["engine_fallback"]
    np.testing.assert_array_equal(ncnn.image.pixels, plain.image.pixels)


def test_auto_calibrates_picks_caches_and_records_its_choice(tmp_path, ctx, monkeypatch):
    model = tiny_compact(tmp_path / "m.pth", num_feat=16, num_conv=4)
    pixels = np.random.default_rng(1).random((48, 64, 3), dtype=np.float32)
    options = UpscaleOptions(model=str(model), tile=32, overlap=8, engine="auto")
    first = UpscaleStage(options).run(_image(pixels), ctx)
    params = json.loads(json.dumps(first.params))
    calibration = params["engine_calibration"]
    measured = {m["engine"]: m for m in calibration["measurements"]}
    assert {"torch", "ncnn", "openvino"} <= set(measured) <= AUTO_CANDIDATES
    exact = [m for name, m in measured.items() if not name.endswith("-bf16")]
    assert all(m["seconds"] > 0 and m["passed"] for m in exact)
    # bf16 twins (only on CPUs with native bf16) pass only at >= 50 dB, and say why not.
    for m in measured.values():
        assert m["passed"] == (m["agreement_db"] is None or m["agreement_db"] >= MIN_AGREEMENT_DB)
        assert m["passed"] or "dB <" in m["reason"]
    fastest = min((m for m in measured.values() if m["passed"]), key=lambda m: m["seconds"])
    fastest = fastest["engine"]
    assert calibration["choice"] == fastest
    assert params["engine"] == fastest.split("@")[0].removesuffix("-bf16")
    assert params["precision"] == ("bf16" if fastest.endswith("-bf16") else "fp32")
    assert calibration["cached"] is False
    if fastest.startswith("ncnn"):
        assert set(params["converted_sha256"]) == {"model.param", "model.bin"}
    if fastest.startswith("openvino"):
        assert set(params["converted_sha256"]) == {"model.xml", "model.bin"}
        assert params["engine_threads"] == (1 if fastest == "ncnn@1" else calibration["threads"])
    # A new stage (a new worker) reuses the recorded decision instead of measuring again, and
    # builds only the engine it records.
    built: list[str] = []

    def counted(real):
        def build(*args, **kwargs):
            built.append(real.__name__)
            return real(*args, **kwargs)

        return build

    monkeypatch.setattr(ncnn_runtime, "NcnnEngine", counted(NcnnEngine))
    monkeypatch.setattr(openvino_runtime, "OpenVinoEngine", counted(OpenVinoEngine))
    second = UpscaleStage(options).run(_image(pixels), ctx)
    expected = {"ncnn": ["NcnnEngine"], "openvino": ["OpenVinoEngine"]}
    assert built == expected.get(fastest.split("@")[0].removesuffix("-bf16"), [])
    assert second.params["engine_calibration"]["cached"] is True
    assert second.params["engine_calibration"]["choice"] == fastest
    assert second.params["engine_calibration"]["measurements"] == calibration["measurements"]


def test_auto_rejects_an_engine_over_the_memory_cap(tmp_path, ctx):
    model = tiny_compact(tmp_path / "m.pth")
    pixels = np.random.default_rng(2).random((40, 40, 3), dtype=np.float32)
    options = UpscaleOptions(model=str(model), tile=32, overlap=8, engine_memory_mb=64)
    # 64 MB is the smallest cap allowed; a tile this small adds far less, so both pass ...
    params = UpscaleStage(options).run(_image(pixels), ctx).params["engine_calibration"]
    assert all(m["passed"] for m in params["measurements"])
    from pipeline.runtimes.calibration import Measurement, _judge, _peak_mb

    # ... the peak is what a call really holds, even after an earlier one freed as much ...
    _peak_mb(lambda: np.ones(64 << 20, np.uint8).sum())
    _, peak = _peak_mb(lambda: np.ones(96 << 20, np.uint8).sum())
    if peak is not None:  # Linux
        assert 80 < peak < 200, peak
    # ... and a measurement over the cap is judged out with the reason.
    judged = _judge("ncnn", 0.1, 3000.0, None, 2048)
    assert judged == Measurement("ncnn", 0.1, 3000.0, None, False, judged.reason)
    assert "3000 MB over the 2048 MB cap" in judged.reason


class _Greedy:
    """An engine that holds memory in proportion to the tile's area, recording each call."""

    def __init__(self, bytes_per_pixel: int) -> None:
        self.bytes_per_pixel = bytes_per_pixel
        self.shapes: list[tuple[int, int]] = []

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        height, width = batch.shape[-2:]
        self.shapes.append((height, width))
        held = np.ones(height * width * self.bytes_per_pixel, np.uint8)
        return batch + float(held[-1]) - 1.0


def test_auto_never_runs_an_engine_at_full_size_when_a_half_tile_foresees_the_cap(tmp_path):
    from pipeline.runtimes.calibration import calibrate

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs: peaks cannot be measured on this platform")
    tile = np.random.default_rng(3).random((128, 128, 3), dtype=np.float32)
    greedy = _Greedy(bytes_per_pixel=16 << 10)  # 64 MB at half size, 256 MB in full
    choice, measured, cached = calibrate(
        {"torch": _Greedy(bytes_per_pixel=1), "ncnn": greedy},
        tile,
        memory_mb=100,  # foreseen at more than twice the cap: never tried
        decisions=tmp_path / "calibration.json",
        key={"model": "greedy"},
    )
    assert choice == "torch" and not cached
    assert greedy.shapes == [(64, 64)]  # the half-size probe only
    rejected = measured[1]
    assert rejected.engine == "ncnn" and not rejected.passed
    assert 200 < rejected.peak_mb < 400, rejected.peak_mb
    assert "over the 100 MB cap (not run at full size)" in rejected.reason
    assert rejected.seconds is None
    recorded = json.loads((tmp_path / "calibration.json").read_text())
    assert [m["seconds"] for m in next(iter(recorded.values()))["measurements"]][1] is None
    # Foreseen over the cap but within twice it (the probe overstates some engines), with the
    # memory free: tried at full size and judged on the peak it really adds.
    greedy.shapes.clear()
    _, measured, _ = calibrate(
        {"torch": _Greedy(bytes_per_pixel=1), "ncnn": greedy},
        tile,
        memory_mb=160,
        decisions=tmp_path / "tried.json",
        key={"model": "greedy"},
    )
    assert (128, 128) in greedy.shapes[1:]
    assert not measured[1].passed and measured[1].seconds is not None
    assert "MB over the 160 MB cap" in measured[1].reason, measured[1].reason
    # Under a cap the estimate passes, the engine runs at full size and agrees with torch.
    greedy.shapes.clear()
    _, measured, _ = calibrate(
        {"torch": _Greedy(bytes_per_pixel=1), "ncnn": greedy},
        tile,
        memory_mb=1024,
        decisions=tmp_path / "other.json",
        key={"model": "greedy"},
    )
    assert greedy.shapes[0] == (64, 64) and (128, 128) in greedy.shapes[1:]
    assert measured[1].passed


def test_the_process_peak_survives_the_reset_a_calibration_makes():
    from pipeline.runtimes.calibration import _peak_mb, _status_kb, peak_rss_mb

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs: peaks cannot be measured on this platform")
    np.ones(300 << 20, np.uint8).sum()  # a peak 300 MB above what the process holds after
    before = peak_rss_mb()
    _peak_mb(lambda: None)  # what calibration does around each engine's first call
    assert _status_kb("VmHWM") / 1024 < before - 200  # the kernel's mark was reset ...
    assert peak_rss_mb() >= before  # ... and the process's peak is still known


@pytest.mark.parametrize("engine", ["ncnn", "openvino"])
def test_tiled_output_of_each_engine_on_a_real_photo_agrees_with_whole_image_torch(ctx, engine):
    weights = shared_file("weights/realesr-general-x4v3.from-ncnn.pth")
    pixels = _photo(96, 128)
    options = {"model": str(weights), "tile": 64}
    tiled = UpscaleStage(UpscaleOptions(engine=engine, **options)).run(_image(pixels), ctx)
    whole = UpscaleStage(UpscaleOptions(engine="torch", model=str(weights), tile=0))
    reference = whole.run(_image(pixels), ctx)
    assert tiled.params["engine"] == engine
    db = psnr8(np.asarray(tiled.image.pixels), np.asarray(reference.image.pixels))
    assert math.isinf(db) or db >= MIN_AGREEMENT_DB, db


def test_stages_without_an_engine_of_their_own_use_the_processing_engine(tmp_path):
    from pipeline.stages.denoise import DenoiseOptions, DenoiseStage

    pixels = np.random.default_rng(4).random((24, 32, 3), dtype=np.float32)
    store = ModelStore(tmp_path / "cache")
    ncnn_ctx = StageContext(models=store, device="cpu", precision="fp32", engine="ncnn")
    openvino_ctx = StageContext(models=store, device="cpu", precision="fp32", engine="openvino")
    torch_ctx = StageContext(models=store, device="cpu", precision="fp32", engine="torch")
    upscaler = tiny_compact(tmp_path / "c.pth")
    upscale = UpscaleStage(UpscaleOptions(model=str(upscaler), tile=0))
    assert upscale.run(_image(pixels), ncnn_ctx).params["engine"] == "ncnn"
    assert upscale.run(_image(pixels), openvino_ctx).params["engine"] == "openvino"
    assert upscale.run(_image(pixels), torch_ctx).params["engine"] == "torch"
    own = UpscaleStage(UpscaleOptions(model=str(upscaler), tile=0, engine="torch"))
    assert own.run(_image(pixels), ncnn_ctx).params["engine"] == "torch"
    # A denoiser ncnn cannot run as spandrel calls it stays on torch, the reason recorded,
    # under "ncnn" as under "auto" (where there is then nothing to measure torch against).
    dncnn = tiny_dncnn(tmp_path / "d.pth")
    options = DenoiseOptions(method="model", model=str(dncnn), tile=0)
    auto_ctx = StageContext(models=store, device="cpu", precision="fp32")
    for ctx in (ncnn_ctx, openvino_ctx, auto_ctx):
        params = DenoiseStage(options).run(_image(pixels), ctx).params
        assert params["engine"] == "torch"
        assert params["engine_requested"] == ctx.engine
        assert "not called as image -> image" in params["engine_fallback"]


def _vulkan_gpus() -> int:
    import ncnn

    return int(ncnn.get_gpu_count())


def test_the_vulkan_device_runs_ncnn_on_the_gpu_and_agrees_with_whole_image_torch(ctx):
    if _vulkan_gpus() == 0:
        pytest.skip(
            "ncnn sees no Vulkan GPU: scripts/setup installs Mesa's software driver "
            "(mesa-vulkan-drivers) when run as root"
        )
    weights = shared_file("weights/realesr-general-x4v3.from-ncnn.pth")
    pixels = _photo(96, 128)
    gpu = StageContext(models=ctx.models, device="vulkan", precision="auto")
    tiled = UpscaleStage(UpscaleOptions(model=str(weights), tile=64)).run(_image(pixels), gpu)
    assert tiled.params["engine"] == "ncnn" and tiled.params["device"] == "vulkan:0"
    assert tiled.params["gpu"] and tiled.params["precision"] == "fp32"
    whole = UpscaleStage(UpscaleOptions(engine="torch", model=str(weights), tile=0))
    reference = whole.run(_image(pixels), ctx)
    db = psnr8(np.asarray(tiled.image.pixels), np.asarray(reference.image.pixels))
    assert math.isinf(db) or db >= MIN_AGREEMENT_DB, db
    # A model ncnn cannot run as spandrel calls it stays on torch, on the CPU, with the reason.
    from pipeline.stages.denoise import DenoiseOptions, DenoiseStage

    dncnn = tiny_dncnn(ctx.models.cache_dir.parent / "d.pth")
    options = DenoiseOptions(method="model", model=str(dncnn), tile=0)
    params = DenoiseStage(options).run(_image(pixels), gpu).params
    assert params["engine"] == "torch" and params["device"] == "cpu"
    assert "not called as image -> image" in params["engine_fallback"]


def test_a_vulkan_device_the_machine_does_not_have_is_refused_by_name():
    from pipeline.errors import StageError
    from pipeline.tiling import resolve_device

    with pytest.raises(StageError, match=r"'vulkan:9'.*Vulkan GPU"):
        resolve_device("vulkan:9")
    with pytest.raises(StageError, match="vulkan or vulkan:N"):
        resolve_device("vulkan:x")
