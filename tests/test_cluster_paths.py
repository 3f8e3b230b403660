"""The cluster's pure parts, without a broker: the path map, what a result may name, and the
[cluster] configuration's checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.cluster.messages import Beat, RemoteResult, RemoteTask
from daemon.cluster.paths import PathMap
from daemon.config import ConfigError, parse_config
from daemon.publish import WrittenFile


def test_the_longest_whole_prefix_wins_both_ways():
    paths = PathMap.from_config(
        {"/volume1/scans": "/mnt/nas/scans", "/volume1/scans/big": "/mnt/big", "/volume1": "/v"}
    )
    assert paths.to_worker("/volume1/scans/a/b.tif") == "/mnt/nas/scans/a/b.tif"
    assert paths.to_worker("/volume1/scans/big/c.tif") == "/mnt/big/c.tif"
    assert paths.to_worker("/volume1/scans2/d.tif") == "/v/scans2/d.tif"  # not /volume1/scans
    assert paths.to_worker("/elsewhere/e.tif") == "/elsewhere/e.tif"
    assert paths.to_coordinator("/mnt/nas/scans/a/b.tif") == "/volume1/scans/a/b.tif"
    assert paths.to_coordinator("/mnt/big/c.tif") == "/volume1/scans/big/c.tif"


def test_a_result_is_trusted_only_with_temporary_files_in_its_folder(tmp_path: Path):
    inside = WrittenFile("image", tmp_path / "._a.png.tmp-1234", ".png", "0" * 64, 1)
    outside = WrittenFile("image", tmp_path.parent / "._a.png.tmp-1234", ".png", "0" * 64, 1)
    final = WrittenFile("image", tmp_path / "a.v1.png", ".png", "0" * 64, 1)
    assert RemoteResult("t", "w@h:1", "ok", files=(inside,)).files_within(tmp_path)
    assert not RemoteResult("t", "w@h:1", "ok", files=(outside,)).files_within(tmp_path)
    assert not RemoteResult("t", "w@h:1", "ok", files=(final,)).files_within(tmp_path)


def test_messages_round_trip_through_json(tmp_path: Path):
    result = RemoteResult(
        "tok",
        "w@h:1",
        "ok",
        files=(WrittenFile("image", tmp_path / "._a.png.tmp-1", ".png", "ab" * 32, 3),),
        stages=[{"stage": "upscale"}],
        seconds=1.5,
        device="cuda:1",
    )
    assert RemoteResult.from_json(result.to_json()) == result
    output = {"format": "same", "quality": 95, "max_pixels": 10, "mask": True}
    task = RemoteTask("tok", 1, "a.png", "/s/a.png", "0" * 64, "/o", "a", "1" * 64,
                      {"m": "2" * 64}, [{"kind": "upscale"}], "fp32", 0, output, "sr")  # fmt: skip
    assert RemoteTask.from_json(task.to_json()) == task
    beat = Beat("w", "h", 1, "cpu", "q", "2026-01-01T00:00:00+00:00", refusing={"r": "why"})
    assert Beat.from_json(beat.to_json()) == beat
    assert beat.ident == "w@h:1"


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ({"broker": "http://nas:6379"}, "cluster.broker: must be"),
        ({"path_map": {"volume1": "/mnt"}}, "cluster.path_map: 'volume1' -> '/mnt': both"),
        ({"worker_timeout": 0}, "cluster.worker_timeout"),
        ({"brokr": "redis://x"}, "cluster.brokr: unknown key"),
    ],
)
def test_a_bad_cluster_section_names_the_key(cluster: dict, message: str):
    with pytest.raises(ConfigError) as caught:
        parse_config({"cluster": cluster}, source="c.toml")
    assert any(line.startswith(f"c.toml: {message}") for line in caught.value.problems), (
        caught.value.problems
    )
