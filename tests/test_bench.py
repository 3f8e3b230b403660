"""bench/upscale.py's helpers on tiny models (measurements, agreement, RSS inputs and children),
bench/quality.py's metrics and a quick run of it on the shared corpus.

No timing is asserted here (timings belong in the benchmark); these prove the helpers work.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import REPO, shared_file
from modelfactory import random_defectunet, tiny_compact

from pipeline.models import ModelStore
from pipeline.tiling import Engine, auto_overlap, tile_starts


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load("bench_upscale", REPO / "bench" / "upscale.py")
reference = sys.modules["_reference"]


def photo(height: int = 96, width: int = 80) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((height, width, 3), dtype=np.float32)


def test_psnr8_is_none_for_identical_images_and_finite_otherwise():
    image = photo()
    assert bench.psnr8(image, image) is None
    shifted = np.clip(image + 1 / 255, 0, 1)
    assert 45 < bench.psnr8(image, shifted) < 50


def test_measure_ours_counts_tiles_and_agrees_with_the_whole_image(tmp_path):
    weights = tiny_compact(tmp_path / "compact.pth")
    descriptor = ModelStore(tmp_path / "cache").load(str(weights)).descriptor
    engine = Engine(descriptor, device="cpu", precision="fp32")
    images = [photo(), photo(64, 72)]
    whole, references = bench.measure_ours(engine, images, 0, reps=1)
    tiled, outputs = bench.measure_ours(engine, images, 48, reps=2, references=references)
    overlap = auto_overlap(descriptor)
    grid = [
        len(tile_starts(h, min(48 + overlap, h), overlap))
        * len(tile_starts(w, min(48 + overlap, w), overlap))
        for h, w in ((96, 80), (64, 72))
    ]
    assert whole.psnr_db == {} and whole.tiles == 2
    assert len(tiled.seconds) == 2 and tiled.tiles == sum(grid) > 2
    assert tiled.megapixels == pytest.approx((96 * 80 + 64 * 72) / 1e6)
    assert list(tiled.psnr_db) == list(bench.PHOTOS)  # one agreement per image
    agreements = [math.inf if p is None else p for p in tiled.psnr_db.values()]  # None: identical
    assert min(agreements) >= 45
    assert outputs[0].shape == (384, 320, 3)


def test_speedup_compares_ours_with_upstream_at_the_same_tile():
    def row(method: str, tile: int, seconds: float):
        return bench.Row(
            model="m",
            method=method,
            precision="fp32",
            tile=tile,
            context="",
            tiles=1,
            megapixels=1.0,
            seconds=[seconds],
            warmup_s=0,
            psnr_db={},
        )

    rows = bench._with_speedups([row("ours", 0, 1), row("ours", 128, 2), row("upstream", 128, 6)])
    assert [r.speedup_vs_upstream for r in rows] == [None, 3.0, None]


def test_rss_input_is_a_16_bit_tiff_of_the_requested_size_mirrored_from_the_photo(tmp_path):
    source = photo(30, 20)
    path = bench.make_rss_input(source, 0.0025, tmp_path)  # 50 x 50
    pixels = tifffile.imread(path)
    assert pixels.shape == (50, 50, 3) and pixels.dtype == np.uint16
    assert np.array_equal(pixels[:30, :20], np.rint(source * 65535).astype(np.uint16))
    assert np.array_equal(pixels[30:60, :20], pixels[:30, :20][::-1][: 50 - 30])


@pytest.fixture
def keep_torch_threads():
    """Both routes set torch's thread count, which is process-wide: restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("keep_torch_threads")
@pytest.mark.parametrize("route", ["cli", "stage"])
def test_rss_child_runs_one_image_end_to_end_and_reports_its_peak(tmp_path, route):
    weights = tiny_compact(tmp_path / "compact.pth")
    source = bench.make_rss_input(photo(), 0.0016, tmp_path)  # 40 x 40
    report = tmp_path / "report.json"
    assert bench.rss_child(bench.RssJob(source, weights, route, 1, report)) == 0
    result = json.loads(report.read_text())
    assert result["error"] is None
    assert result["output_size"] == [160, 160] and result["output_bits"] == 16
    assert result["peak_rss_mb"] >= result["baseline_rss_mb"] > 0


def test_upstream_import_stubs_basicsr_only_while_loading(tmp_path):
    if importlib.util.find_spec("basicsr"):
        pytest.skip("basicsr is installed here, so no stub is needed")
    source = tmp_path / "utils.py"
    source.write_text(
        textwrap.dedent("""\
        from basicsr.utils.download_util import load_file_from_url

        class RealESRGANer:
            fetch = staticmethod(load_file_from_url)
        """)
    )
    module = reference._import_with_stubs(source)
    assert "basicsr" not in sys.modules
    with pytest.raises(reference.UpstreamUnavailable, match="refusing to fetch"):
        module.RealESRGANer.fetch("https://example.invalid/weights.pth")


quality = _load("bench_quality", REPO / "bench" / "quality.py")


def test_sr_scores_of_the_truth_itself_are_perfect_and_blur_lowers_sharpness():
    truth = quality.cv2.GaussianBlur(photo(64, 64), (0, 0), 1.0)
    perfect = quality.sr_scores(truth, truth)
    assert perfect["psnr_y"] is None  # identical: no finite PSNR
    assert perfect["ssim_y"] == pytest.approx(1.0)
    assert perfect["sharpness"] == pytest.approx(1.0)
    small = quality.resize(truth, (16, 16), quality.cv2.INTER_AREA)
    blurred = quality.sr_scores(quality.resize(small, (64, 64), quality.cv2.INTER_CUBIC), truth)
    assert blurred["sharpness"] < 0.6 and blurred["ssim_y"] < 0.8 and blurred["psnr_y"] < 35


def test_city100_ratio_recovers_the_factor_a_blurred_copy_was_made_with():
    high = photo(180, 240)
    small = quality.resize(high, (80, 60), quality.cv2.INTER_AREA)  # 1/3 of the detail
    low = quality.resize(small, (240, 180), quality.cv2.INTER_CUBIC)
    assert quality.city100_ratio(low, high) == pytest.approx(3.0)


def run_bench(script: str, *argv: str) -> subprocess.CompletedProcess:
    """Run bench/SCRIPT with these arguments as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_busiest_window_finds_the_textured_patch():
    weight = np.zeros((100, 120))
    weight[60:80, 30:50] = 1
    assert quality.busiest_window(weight, 20) == (60, 30)


def test_quick_upscale_run_writes_per_image_and_mean_scores_with_provenance(tmp_path):
    shared_file("corpus/sr_benchmark/Set5/LR_bicubic_X4")
    out, sheet = tmp_path / "quality.json", tmp_path / "sheet.png"
    argv = ["--quick", "--sections", "upscale", "--out", str(out), "--sheet", str(sheet)]
    done = run_bench("quality.py", *argv)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["command"].endswith("bench/quality.py " + " ".join(argv))
    assert "denoise" not in report and "restore" not in report
    methods = {"bicubic", "lanczos", "general-x4v3", "x4plus"}
    for name in ("Set5", "Set14", "City100"):
        data = report["upscale"]["sets"][name]
        assert len(data["images"]) == 1 and set(data["mean"]) == methods
        assert all(0 < data["mean"][m]["ssim_y"] <= 1 for m in methods)
    assert {m["model_sha256"] for m in report["models"].values()} == {
        quality.sha256_file(path) for path in quality.UPSCALE_MODELS.values()
    }
    assert any(path.startswith("corpus/real_lr_hr_pairs/City100") for path in report["corpus"])
    assert 2 <= report["upscale"]["sets"]["City100"]["pairs"]["detail_ratio"] <= 4.5
    image = quality.cv2.imread(str(sheet))
    assert image.shape[1] > 4 * quality.SHEET_CELL and report["sheet"]["bytes"] < 2_000_000
    assert "upscale x4, Set14" in done.stdout


def test_synthetic_damage_is_seeded_marks_what_it_changed_and_adds_only_grain_elsewhere():
    clean = quality.cv2.GaussianBlur(photo(200, 240), (0, 0), 2.0)
    first, again, other = (quality.damage(clean, seed) for seed in (7, 7, 8))
    assert np.array_equal(first.pixels, again.pixels) and np.array_equal(first.mask, again.mask)
    assert not np.array_equal(first.mask, other.mask)
    assert first.scratches >= 1 and first.spots >= 3
    assert first.scratched.any() and not np.any(first.scratched & ~first.mask)
    # Dark and bright defects both: darkened is the part of the damage below the clean tone.
    assert first.darkened.any() and (first.mask & ~first.darkened).any()
    assert not np.any(first.darkened & ~first.mask)
    below = first.pixels.mean(axis=2) - first.grainy.mean(axis=2)
    assert np.median(below[first.darkened]) < -0.05
    assert np.median(below[first.mask & ~first.darkened]) > 0.05
    assert 0.002 < first.mask.mean() < 0.2
    grain = first.grainy - clean
    assert abs(float(np.std(grain[~first.mask])) - quality.GRAIN_SIGMA) < 0.2 * quality.GRAIN_SIGMA
    # Outside the damage only the grain differs; inside, the defects moved pixels visibly.
    outside = ~first.mask
    assert np.allclose(first.pixels[outside], first.grainy[outside], atol=quality.VISIBLE)
    moved = np.max(np.abs(first.pixels - first.grainy), axis=2)[first.mask]
    assert np.median(moved) > 0.1


def test_quick_restore_run_reports_damage_clean_change_and_detection(tmp_path):
    shared_file("corpus/sr_benchmark/Set14/HR")
    out = tmp_path / "quality.json"
    argv = [
        "--quick",
        "--sections",
        "restore",
        "--out",
        str(out),
        "--sheet",
        str(tmp_path / "s.png"),
    ]
    done = run_bench("quality.py", *argv)
    assert done.returncode == 0, done.stderr
    section = json.loads(out.read_text())["restore"]
    assert [row["image"].split("/")[0] for row in section["images"]] == ["Set5", "Set14"]
    for row in section["images"]:
        assert row["size"] == [192, 192] and row["damaged_fraction"] > 0
        assert row["region_before_db"] < 30 < row["outside_before_db"]  # the damage is visible
        assert row["grain_before_db"] == pytest.approx(42, abs=1)  # grain sigma 2/255
        assert 0 <= row["recall"] <= 1 and 0 <= row["recall_scratches"] <= 1
        dark, bright = row["recall_dark"], row["recall_bright"]
        assert dark is not None and bright is not None and 0 <= dark <= 1 and 0 <= bright <= 1
        low, high = sorted((dark, bright))
        assert low - 1e-9 <= row["recall"] <= high + 1e-9  # the whole lies between its parts
        if row["clean_changed_fraction"] == 0:
            assert row["clean_psnr"] is None  # restore left the clean image identical
        else:
            assert row["clean_psnr"] > 0
    assert set(section["definitions"]) >= {"region", "clean_psnr", "grain_change_db"}
    assert section["summary"]["mean_region_before_db"] is not None
    assert "restore (defaults" in done.stdout


def test_the_learned_restore_section_measures_the_weights_and_threshold_it_is_given(tmp_path):
    shared_file("corpus/sr_benchmark/Set14/HR")
    weights = random_defectunet(tmp_path / "candidate.safetensors")
    out = tmp_path / "quality.json"
    argv = ["--quick", "--sections", "restore-learned", "--detector-model", str(weights)]
    argv += ["--threshold", "0.05", "--out", str(out), "--sheet", str(tmp_path / "s.png")]
    done = run_bench("quality.py", *argv)
    assert done.returncode == 0, done.stderr
    section = json.loads(out.read_text())["restore-learned"]
    assert section["options"]["detector"] == "learned"
    assert section["options"]["detector_model"] == str(weights)
    assert section["options"]["threshold"] == 0.05
    assert all(row["recall"] is not None for row in section["images"])


def test_quick_colour_run_reports_every_kind_and_the_faded_copies(tmp_path):
    shared_file("corpus/sr_benchmark/Set5/HR")
    out = tmp_path / "colour.json"
    done = run_bench("colour.py", "--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    kinds = report["summary"]["kinds"]
    assert set(kinds) == {"clean", "low-key", "high-key", "saturated", "monochrome", "sepia",
                          "cyanotype", "selenium"}  # fmt: skip
    assert all(kind["images"] == 5 for kind in kinds.values())
    assert len(report["images"]) == 40 and len(report["faded"]) == 5
    summary = report["summary"]  # bit-identical outputs are counted, per kind and in all
    assert sum(kind["identical"] for kind in kinds.values()) == summary["all"]["identical"]
    assert summary["all"]["identical"] == sum(row["identical"] for row in report["images"])
    assert summary["faded_untouched"] == sum(faded["identical"] for faded in report["faded"])
    for faded in report["faded"]:
        assert faded["delta_e_before"] > 5  # the simulated fading is visible
    assert "faded (5): mean delta E" in done.stdout


def test_quality_exits_2_naming_the_folder_where_shared_is_absent(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "shared"
    monkeypatch.setattr(quality, "SHARED", missing)
    out = tmp_path / "quality.json"
    assert quality.main(["--quick", "--out", str(out)]) == 2
    assert f"{missing} is absent" in capsys.readouterr().err
    assert not out.exists()


def test_gpu_bench_dry_run_checks_every_step_on_the_cpu(tmp_path, capsys):
    shared_file("corpus/old_photos/historic/bop_old_b.png")
    gpu = _load("bench_gpu", REPO / "bench" / "gpu.py")
    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["gpu"].startswith("none") and report["broken_outputs"] == 0
    for name in ("x4plus", "general-x4v3"):
        rows = report["models"][name]["rows"]
        assert {(r["tile"], r["batch"]) for r in rows} == {(0, 1), (32, 1), (32, 4)}
        assert all(r["s_per_mp"] > 0 for r in rows)
        assert report["models"][name]["auto_precision"] == "fp32"  # the CPU never runs fp16
    assert report["oom"]["tile_used"] == 32 < report["oom"]["asked_tile"]
    assert "out of memory" in capsys.readouterr().out


def test_the_auto_row_times_what_the_upscale_stage_picks_from_a_cold_cache(tmp_path):
    weights = tiny_compact(tmp_path / "compact.pth")
    images = [photo(64, 64)]
    case = bench.Case("tiny", weights, 64, 1, (32,))
    engine, info = bench.auto_engine(case, images, 32, tmp_path)
    assert engine.name == f"auto:{info['choice']}"
    assert info["calibration"]["cached"] is False and info["first_use_s"] > 0
    measured = {m["engine"] for m in info["calibration"]["measurements"]}
    assert {"torch", "openvino"} <= measured and info["choice"] in measured
    row, _ = bench.measure_ours(engine, images, 32, reps=1)
    assert row.engine == engine.name and row.tiles > 1


def test_split_bench_parses_splits_and_refuses_nonsense():
    split = _load("bench_split", REPO / "bench" / "split.py")
    assert split.parse_splits("1x2, 2x1") == [(1, 2), (2, 1)]
    for bad in ("2", "0x2", "2x0", "axb", "2x1x1"):
        with pytest.raises(Exception, match="expected WORKERSxTHREADS"):
            split.parse_splits(bad)


def test_split_bench_runs_each_split_with_real_weights_and_reports_throughput(tmp_path):
    shared_file("weights/realesr-general-x4v3.from-ncnn.pth")
    out = tmp_path / "split.json"
    command = [sys.executable, str(REPO / "bench" / "split.py"), "--splits", "1x1,2x1",
               "--crop", "48", "--tile", "32", "--images", "1", "--rounds", "1",
               "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    rows = {(r["workers"], r["threads"]): r for r in report["rows"]}
    assert set(rows) == {(1, 1), (2, 1)}
    assert rows[(2, 1)]["images"] == 2 and len(rows[(2, 1)]["seconds_per_image"]) == 2
    for row in rows.values():
        assert row["images_per_hour"] > 0 and row["peak_rss_mb_per_worker"] > 0
        assert row["engines"] and all(e.endswith(("(fp32)", "(bf16)")) for e in row["engines"])
    assert set(report["best_images_per_hour"]) == {"1x1", "2x1"}


@pytest.mark.slow
def test_face_bench_measures_the_restorer_on_each_engine_and_runs_the_choice(tmp_path, capsys):
    shared_file("weights/detection_mobilenet0.25_Final.pth")
    face = _load("bench_face", REPO / "bench" / "face.py")
    out = tmp_path / "face.json"
    assert face.main(["--model", "restoreformer", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    measured = {m["engine"]: m for m in report["calibration"]["measurements"]}
    assert {"torch", "openvino"} <= set(measured) and all(m["seconds"] for m in measured.values())
    assert "ncnn" in report["calibration"]["unavailable"]
    runs = report["runs"]
    assert runs["torch"]["engine"] == "torch" and runs["openvino"]["engine"] == "openvino"
    assert runs["auto"]["engine"] == report["calibration"]["choice"].removesuffix("-bf16")
    assert all(run["faces"] == 1 for run in runs.values())
    assert "chose " in capsys.readouterr().out
