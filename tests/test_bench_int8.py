"""bench/int8.py: the int8 simulation on tiny models of the real architectures, and one short run
of the script on the real weights."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import spandrel
import torch
from conftest import REPO, shared_file
from modelfactory import tiny_compact, tiny_rrdbnet


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_int8", REPO / "bench" / "int8.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_int8"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _model(path: Path) -> torch.nn.Module:
    return spandrel.ModelLoader().load_from_file(path).model.float().eval()


def _images(count: int, size: int = 24, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    shape = (1, 3, size, size)
    return [torch.from_numpy(rng.random(shape, dtype=np.float32)) for _ in range(count)]


def test_quantize_weight_rounds_each_output_channel_to_its_own_127_steps():
    weight = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    weight[1] *= 100  # channels of very different ranges keep their own steps
    weight[2] = 0
    quantized = bench.quantize_weight(weight)
    for channel in range(2):
        step = float(weight[channel].abs().max()) / 127
        levels = quantized[channel] / step
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert float(levels.abs().max()) <= 127 + 1e-3
        assert float((quantized[channel] - weight[channel]).abs().max()) <= step / 2 + 1e-6
    assert torch.equal(quantized[2], torch.zeros_like(weight[2]))


def test_rrdbnet_coverages_nest_and_their_shares_of_the_multiply_adds_shrink(tmp_path):
    model = _model(tiny_rrdbnet(tmp_path / "x4.pth", num_filters=8, num_blocks=2))
    sets = bench.coverages(model)
    assert list(sets) == ["all", "trunk", "trunk less conv5"]
    assert set(sets["trunk less conv5"]) < set(sets["trunk"]) < set(sets["all"])
    assert all(".conv5" not in name for name in sets["trunk less conv5"])
    macs = bench.multiply_adds(model, _images(1)[0])
    assert set(macs) == set(sets["all"])
    shares = [sum(macs[n] for n in chosen) / sum(macs.values()) for chosen in sets.values()]
    assert shares[0] == 1.0 and shares[0] > shares[1] > shares[2] > 0


def test_nothing_quantized_is_exact_and_the_model_is_left_as_it_was(tmp_path):
    model = _model(tiny_compact(tmp_path / "c.pth", num_feat=8, num_conv=2))
    calibration, (test,) = _images(2, seed=1), _images(1, seed=2)
    ranges = bench.input_ranges(model, calibration)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = bench._pixels(model(test))
    untouched = bench.simulate(model, [], ranges, {"t": test}, weights=True, inputs=True)
    assert np.array_equal(untouched["t"], reference)
    everything = list(bench.convolutions(model))
    quantized = bench.simulate(model, everything, ranges, {"t": test}, weights=True, inputs=True)
    assert not np.array_equal(quantized["t"], reference)  # int8 changes the output...
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # ...but not the model
    with torch.no_grad():
        assert np.array_equal(bench._pixels(model(test)), reference)  # and its hooks are gone


def test_study_rows_name_each_set_mode_and_scale_with_a_worst_agreement(tmp_path):
    model = _model(tiny_compact(tmp_path / "c.pth", num_feat=8, num_conv=2))
    rows = bench.study("tiny", model, _images(2, seed=1), {"a": _images(1, seed=2)[0]})
    sets = list(bench.coverages(model))
    # inputs quantized: one row per input scale (2); weights only: one row
    assert len(rows) == len(sets) * (2 + 1 + 2)
    assert {(r.convs, r.mode) for r in rows} == {(s, m) for s in sets for m in bench.MODES}
    for row in rows:
        assert row.worst_db == min(row.agreement_db.values())
        assert row.scale == ("-" if row.mode == "weights" else row.scale)
        assert 0 < row.mac_share <= 1


def test_int8_bench_writes_every_row_for_the_real_weights(tmp_path):
    shared_file("weights/realesr-general-x4v3.from-ncnn.pth")
    out = tmp_path / "int8.json"
    done = subprocess.run(
        [sys.executable, "bench/int8.py", "--models", "general-x4v3", "--crop", "48", "--out", out],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert len(rows) == 2 * 5  # two sets of convolutions, five mode/scale rows each
    assert {row["model"] for row in rows} == {"general-x4v3"}
    for row in rows:
        assert set(row["agreement_db"]) == {"bop_old_c", "baboon"}
        # int8 moves every output of a real network: never identical, never exact to 60 dB
        values = row["agreement_db"].values()
        assert all(v is not None and math.isfinite(v) and v < 60 for v in values)
    assert "general-x4v3" in done.stdout and "agreement dB" in done.stdout
