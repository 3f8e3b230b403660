"""The one-shot CLI: `scanrestore process` and `scanrestore models`, run in-process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORPUS, NO_SHARED, SHARED, shared_file
from modelfactory import tiny_compact

from daemon.cli import main
from pipeline.files import sha256_file

HOSTILE = sorted((CORPUS / "hostile_inputs").glob("*")) if SHARED.is_dir() else []


@pytest.fixture
def tiny_x4(tmp_path) -> Path:
    return tiny_compact(tmp_path / "weights" / "tiny-x4.pth", scale=4)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("SCANRESTORE_CACHE_DIR", str(path))
    return path


def run_json(capsys, *argv: str) -> tuple[int, list[dict]]:
    code = main(list(argv))
    lines = capsys.readouterr().out.splitlines()
    return code, [json.loads(line) for line in lines]


def test_process_writes_versioned_outputs_and_json_records(tmp_path, capsys, tiny_x4, cache):
    photo = shared_file("corpus/sr_benchmark/Set5/LR_bicubic_X4/babyx4.png")
    argv = ["process", str(photo), "--out", str(tmp_path / "out"), "--model", str(tiny_x4)]
    code, records = run_json(capsys, *argv, "--scale", "2", "--json")
    assert code == 0
    (record,) = records
    assert {"input", "output", "status", "error", "seconds", "stages"} <= record.keys()
    assert record["status"] == "ok" and record["error"] is None
    assert Path(record["output"]).name == f"{photo.stem}.v1{photo.suffix}"
    (stage,) = record["stages"]
    assert stage["stage"] == "upscale"
    assert stage["params"]["model_sha256"] == sha256_file(tiny_x4)
    assert stage["params"]["scale"] == 2
    _, again = run_json(capsys, *argv, "--scale", "2", "--json")
    assert Path(again[0]["output"]).name == f"{photo.stem}.v2{photo.suffix}"
    assert Path(record["output"]).read_bytes() != b""


def test_a_process_output_carries_the_stamp_and_mask_sidecar_of_a_daemon_output(
    tmp_path, capsys, cache
):
    """`scanrestore process` runs daemon.processing like the daemon's workers: the provenance
    stamp (Software, RunId, recipe hash, stages) in the file, the mask of invented pixels beside
    it at the same version, and nothing left under a temporary name."""
    import cv2
    import numpy as np
    import piexif
    from test_image_conformance import exif_dict

    from daemon.publish import TEMP_MARKER
    from pipeline.image import decode

    ramp = np.linspace(0.2, 0.6, 128, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1)
    for y, x in ((20, 30), (70, 90), (100, 40)):  # bright specks of dust on a smooth scan
        pixels[y : y + 2, x : x + 2] = 1.0
    photo = tmp_path / "dusty.png"
    cv2.imwrite(str(photo), np.rint(pixels * 255).astype(np.uint8))
    out = tmp_path / "out"
    code, (record,) = run_json(
        capsys, "process", str(photo), "--out", str(out), "--chain", "restore", "--json"
    )
    assert code == 0, record
    assert sorted(p.name for p in out.iterdir()) == ["dusty.v1.mask.png", "dusty.v1.png"]
    assert not [p for p in out.iterdir() if TEMP_MARKER in p.name]
    output = decode(Path(record["output"]))
    software = exif_dict(output.metadata.exif)["0th"][piexif.ImageIFD.Software]
    assert software.startswith(b"scanrestore ")
    xmp = output.metadata.xmp.decode()
    assert re.search(r"<scanrestore:RunId>[0-9a-f]{16}</scanrestore:RunId>", xmp)
    assert re.search(r"<scanrestore:RecipeSHA256>[0-9a-f]{64}</scanrestore:RecipeSHA256>", xmp)
    assert "<rdf:li>restore v" in xmp
    mask = decode(out / "dusty.v1.mask.png")
    assert (mask.width, mask.height) == (output.width, output.height)
    assert mask.pixels.max() > 0  # the specks are marked as invented
    _, (again,) = run_json(
        capsys, "process", str(photo), "--out", str(out), "--chain", "restore", "--json"
    )
    assert Path(again["output"]).name == "dusty.v2.png" and (out / "dusty.v2.mask.png").exists()


@pytest.mark.skipif(not SHARED.is_dir(), reason=NO_SHARED)
def test_every_hostile_input_fails_clearly_and_the_batch_goes_on(tmp_path, capsys, tiny_x4, cache):
    good = shared_file("corpus/metadata_edge_cases/exifsamples_Canon_40D.jpg")
    assert HOSTILE, "corpus/hostile_inputs is empty"
    inputs = [*HOSTILE, good]
    code, records = run_json(
        capsys,
        "process",
        *map(str, inputs),
        "--out",
        str(tmp_path / "out"),
        "--model",
        str(tiny_x4),
        "--scale",
        "1",
        "--json",
    )
    assert code == 1
    assert [r["input"] for r in records] == [str(p) for p in inputs]
    for path, record in zip(HOSTILE, records, strict=False):
        assert record["status"] == "error", f"{path.name} was accepted"
        assert record["error"].startswith(str(path)), record["error"]
        assert record["error_type"] in {
            "DecodeError",
            "UnsupportedImageError",
            "ImageTooLargeError",
        }, record
    assert records[-1]["status"] == "ok"
    assert not [p for p in (tmp_path / "out").iterdir() if not p.name.endswith(".v1.jpg")]


def test_exit_status_is_zero_only_when_every_input_succeeds(tmp_path, capsys, tiny_x4, cache):
    missing = tmp_path / "nope.png"
    code, records = run_json(
        capsys,
        "process",
        str(missing),
        "--out",
        str(tmp_path / "o"),
        "--model",
        str(tiny_x4),
        "--json",
    )
    assert code == 1
    assert records[0]["status"] == "error" and str(missing) in records[0]["error"]


def test_config_errors_exit_2_with_one_line_per_problem(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[processing]\ndevice = 'gpu'\n[[pipeline.stages]]\nkind = 'blur'\n")
    code = main(["--config", str(config), "process", "x.png", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"error: {config}: processing.device: "
        "must be auto, cpu, mps, cuda, cuda:N, vulkan or vulkan:N",
        f"error: {config}: pipeline.stages[0].kind: unknown stage 'blur' "
        "(one of denoise, face, restore, upscale)",
    ]


def test_a_missing_model_stops_before_any_image_saying_how_to_get_it(tmp_path, capsys, cache):
    config = tmp_path / "offline.toml"
    config.write_text("[models]\nauto_fetch = false\n")
    photo = shared_file("corpus/metadata_edge_cases/exifsamples_Canon_40D.jpg")
    out = tmp_path / "o"
    code = main(["--config", str(config), "process", str(photo), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: pipeline.stages[0] (upscale): realesrgan-x4plus: weights are")
    assert "scanrestore models fetch" in line
    assert not out.exists()


def test_models_import_list_and_verify(tmp_path, capsys, tiny_x4, cache):
    assert main(["models", "import", str(tiny_x4), "--id", "tiny-x4"]) == 0
    assert "tiny-x4" in capsys.readouterr().out
    assert main(["models", "list", "--json"]) == 0
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["tiny-x4"]["status"] == "present"
    assert rows["realesrgan-x4plus"]["status"] == "missing"
    assert main(["models", "verify"]) == 0
    assert "ok" in capsys.readouterr().out
    stored = next(cache.rglob("*.pth"))
    stored.write_bytes(stored.read_bytes()[:-10])
    assert main(["models", "verify", "--json"]) == 1
    (result,) = json.loads(capsys.readouterr().out)
    assert result["status"] == "mismatch" and result["expected_sha256"] == sha256_file(tiny_x4)


def test_models_bench_measures_the_engines_once_and_shows_what_auto_picks(capsys, tiny_x4, cache):
    photo = shared_file("corpus/sr_benchmark/Set5/LR_bicubic_X4/babyx4.png")
    argv = ["models", "bench", str(tiny_x4), "--image", str(photo), "--tile", "48"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cached"] is False and report["tile"] == [72, 72]  # tile + the auto overlap
    engines = {m["engine"]: m for m in report["measurements"]}
    assert {"torch", "ncnn", "openvino"} <= set(engines)
    assert set(engines) <= {"torch", "ncnn", "ncnn@1", "openvino", "torch-bf16", "openvino-bf16"}
    assert report["choice"] == min(engines.values(), key=lambda m: m["seconds"])["engine"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "(recorded earlier)" in table and f"auto picks: {report['choice']}" in table
    assert table.count(" ok") == len(engines)


def test_models_fetch_failure_is_reported_not_raised(tmp_path, capsys, cache):
    assert main(["models", "fetch", "no-such-model"]) == 1
    assert "no-such-model" in capsys.readouterr().err


def test_console_script_runs_as_a_module(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0
    assert "process" in result.stdout and "models" in result.stdout


# --- conformance of `scanrestore process` on every metadata edge case -------------------------


@pytest.mark.skipif(not SHARED.is_dir(), reason=NO_SHARED)
def test_every_metadata_edge_case_round_trips_through_process_or_is_refused(
    tmp_path, capsys, cache
):
    """File by file: refused with an "unsupported" reason, or processed with ICC bytes, EXIF
    tags, bit depth, channels and alpha kept and upright pixels (the model is an exact nearest-
    neighbour 2x, so the expected output is known)."""
    import numpy as np
    from modelfactory import nearest_compact
    from test_image_conformance import REFUSED, assert_exif_kept, assert_side_metadata_kept

    from pipeline.image import decode

    model = nearest_compact(tmp_path / "nearest-x2.pth", scale=2)
    inputs = sorted((CORPUS / "metadata_edge_cases").iterdir())
    code, records = run_json(
        capsys,
        "process",
        *map(str, inputs),
        "--out",
        str(tmp_path / "o"),
        "--model",
        str(model),
        "--scale",
        "2",
        "--json",
    )
    assert code == 1  # the refused files fail the batch
    failures = []
    for path, record in zip(inputs, records, strict=True):
        try:
            _check_edge_case(path, record, REFUSED, decode)
            if record["status"] == "ok":
                output = decode(Path(record["output"]))
                source = _as_stamped(decode(path), output, record)
                assert_exif_kept(source, output)
                assert_side_metadata_kept(source, output)
                expected = np.repeat(np.repeat(source.pixels, 2, axis=0), 2, axis=1)
                error = np.abs(output.pixels - expected)
                if source.format in ("png", "tiff"):  # lossless: only the final rounding
                    assert error.max() <= 0.5 / (2**output.bit_depth - 1) + 1e-6
                else:
                    assert error.mean() < 0.02
        except AssertionError as exc:
            failures.append(f"{path.name}: {exc}")
    assert not failures, "\n".join(failures)


def _as_stamped(source, output, record):
    """`source` with the provenance stamp `output` carries (Software, RunId, recipe, stages):
    the metadata an output must keep is the original's plus that stamp, nothing else."""
    import re

    from daemon.processing import Stamp, code_version, stamped_metadata

    fields = dict(re.findall(rb"<scanrestore:(RunId|RecipeSHA256)>([^<]*)<", output.metadata.xmp))
    stamp = Stamp(
        f"scanrestore {code_version()}",
        fields[b"RunId"].decode(),
        fields[b"RecipeSHA256"].decode(),
    )
    return source.replace(metadata=stamped_metadata(source.metadata, record["stages"], stamp))


def _check_edge_case(path, record, refused, decode) -> None:
    if path.name in refused:
        assert record["status"] == "error", "a refused kind was processed"
        assert record["error_type"] == "UnsupportedImageError", record["error"]
        assert record["error"].startswith(str(path)) and refused[path.name] in record["error"]
        return
    assert record["status"] == "ok", record["error"]
    source, output = decode(path), decode(Path(record["output"]))
    assert output.format == source.format
    assert output.metadata.icc_profile == source.metadata.icc_profile, "ICC changed"
    if source.format in ("png", "tiff"):
        assert output.bit_depth == source.bit_depth
    assert output.channels == source.channels
    assert (output.alpha is None) == (source.alpha is None)
    assert output.metadata.orientation == 1
    assert (output.width, output.height) == (source.width * 2, source.height * 2)


def test_chain_option_runs_the_named_stages_in_order(tmp_path, capsys, tiny_x4, cache):
    photo = shared_file("corpus/sr_benchmark/Set5/LR_bicubic_X4/babyx4.png")
    code, records = run_json(
        capsys,
        "process",
        str(photo),
        "--out",
        str(tmp_path / "o"),
        "--chain",
        "denoise,upscale",
        "--model",
        str(tiny_x4),
        "--scale",
        "2",
        "--json",
    )
    assert code == 0
    assert [stage["stage"] for stage in records[0]["stages"]] == ["denoise", "upscale"]
    assert records[0]["stages"][0]["params"]["method"] == "nlm"


def test_chain_option_takes_stage_options_from_the_config(tmp_path, capsys, tiny_x4, cache):
    config = tmp_path / "c.toml"
    config.write_text(
        "[[pipeline.stages]]\nkind = 'denoise'\nstrength = 0.25\n"
        "[[pipeline.stages]]\nkind = 'upscale'\nscale = 2\n"
    )
    photo = shared_file("corpus/sr_benchmark/Set5/LR_bicubic_X4/babyx4.png")
    _, records = run_json(
        capsys,
        "--config",
        str(config),
        "process",
        str(photo),
        "--out",
        str(tmp_path / "o"),
        "--chain",
        "upscale",
        "--model",
        str(tiny_x4),
        "--json",
    )
    stages = records[0]["stages"]
    assert [s["stage"] for s in stages] == ["upscale"]  # only the kinds named, in that order
    assert stages[0]["params"]["scale"] == 2  # with the config's options for that kind


def test_chain_option_in_a_senseless_order_fails_before_any_image(tmp_path, capsys, cache):
    out = tmp_path / "o"
    code = main(["process", "x.png", "--out", str(out), "--chain", "upscale,denoise"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "--chain[1].kind: 'denoise' after 'upscale' (stage 0): put 'denoise' first" in err


def test_chain_option_with_an_unknown_kind_fails_before_any_image(tmp_path, capsys, cache):
    code = main(["process", "x.png", "--out", str(tmp_path / "o"), "--chain", "denoise,sharpen"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--chain[1].kind: unknown stage 'sharpen'" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_full_chain_runs_end_to_end_on_a_real_portrait(tmp_path, capsys, cache):
    """denoise, restore, face, upscale through `process`: real DnCNN, real RetinaFace
    mobilenet0.25 and real general-x4v3 weights; GFPGAN is randomly initialised (its real
    weights cannot be had here), which proves the plumbing, not the looks."""
    from modelfactory import random_gfpgan

    from pipeline.image import decode

    weights = SHARED / "weights"
    gfpgan = random_gfpgan(tmp_path / "gfpgan-random.pth")
    config = tmp_path / "chain.toml"
    config.write_text(
        "[models]\nauto_fetch = false\n"
        "[[pipeline.stages]]\nkind = 'denoise'\nmethod = 'dncnn'\nstrength = 0.5\n"
        f"model = '{shared_file('weights/dncnn_color_blind.pth')}'\n"
        "[[pipeline.stages]]\nkind = 'restore'\n"
        f"[[pipeline.stages]]\nkind = 'face'\nmodel = '{gfpgan}'\n"
        f"detector = '{weights / 'detection_mobilenet0.25_Final.pth'}'\nparser = ''\n"
        "fidelity = 0.5\n"
        "[[pipeline.stages]]\nkind = 'upscale'\nscale = 2\n"
        f"model = '{weights / 'realesr-general-x4v3.from-ncnn.pth'}'\n"
    )
    photo = shared_file("corpus/faces/whole_imgs/skimage_astronaut.png")
    code, records = run_json(
        capsys,
        "--config",
        str(config),
        "process",
        str(photo),
        "--out",
        str(tmp_path / "o"),
        "--chain",
        "denoise,restore,face,upscale",
        "--json",
    )
    assert code == 0, records
    stages = {stage["stage"]: stage for stage in records[0]["stages"]}
    assert set(stages) == {"denoise", "restore", "face", "upscale"}
    assert stages["face"]["params"]["faces"] and stages["face"]["skipped"] is None
    assert stages["face"]["params"]["scale"] == [2.0, 2.0]  # pasted at the output resolution
    out = decode(Path(records[0]["output"]))
    assert (out.width, out.height) == (1024, 1024)
