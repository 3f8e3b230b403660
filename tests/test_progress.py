"""A running job's progress: the chain announces each stage, a tiled stage its tiles, and the
worker's writer keeps one small JSON file current for the dashboard to read."""

from __future__ import annotations

import json

import numpy as np
from modelfactory import tiny_compact

from daemon.progress import ProgressWriter, progress_path, read_progress
from pipeline.chain import build_chain
from pipeline.image.values import Image, Metadata
from pipeline.models import ModelStore
from pipeline.stage import StageContext


def test_the_chain_announces_each_stage_and_the_writer_records_stage_and_tiles(tmp_path):
    path = progress_path(tmp_path, 7)
    writer = ProgressWriter(path, stages=2, interval=0.0)
    seen: list[tuple[str, int, int, int]] = []

    def tiles(done: int, total: int) -> None:
        writer.tiles(done, total)
        now = read_progress(tmp_path, 7)
        seen.append((now.stage, now.stages_done, now.done, now.total))

    model = tiny_compact(tmp_path / "tiny.pth", scale=2)
    chain = build_chain(
        [{"kind": "restore"}, {"kind": "upscale", "model": str(model), "scale": 2, "tile": 32}]
    )
    pixels = np.random.default_rng(0).random((64, 96, 3), dtype=np.float32)
    ctx = StageContext(
        models=ModelStore(tmp_path / "cache"),
        precision="fp32",
        progress=tiles,
        on_stage=writer.stage,
    )
    image = Image(pixels=pixels, alpha=None, bit_depth=8, format="png", metadata=Metadata())
    chain.run(image, ctx)
    assert seen, "the tiled stage reported no tiles"
    assert {(stage, index) for stage, index, _, _ in seen} == {("upscale", 1)}
    assert seen[-1][2] == seen[-1][3] == 6  # 2 x 3 tiles of 32 px, all done
    assert json.loads(path.read_text()) == {
        "stage": "upscale", "done": 6, "total": 6, "stages_done": 1, "stages": 2,
    }  # fmt: skip
    assert read_progress(tmp_path, 8) is None  # no file: no progress, and no error
    path.write_text("{not json")
    assert read_progress(tmp_path, 7) is None
