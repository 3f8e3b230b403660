"""Versioned outputs: never overwrite, never reuse a version, no temporary file left behind."""

from __future__ import annotations

import pytest

from daemon.outputs import TEMP_MARKER, existing_versions, publish_version


def writer(content: bytes):
    def write(path):
        path.write_bytes(content)

    return write


def test_versions_count_up_and_files_are_never_overwritten(tmp_path):
    first, v1 = publish_version(tmp_path, "scan", ".tif", writer(b"one"))
    second, v2 = publish_version(tmp_path, "scan", ".tif", writer(b"two"))
    assert (first.name, v1, second.name, v2) == ("scan.v1.tif", 1, "scan.v2.tif", 2)
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"


def test_a_version_taken_under_another_suffix_is_not_reused(tmp_path):
    (tmp_path / "scan.v1.png").write_bytes(b"x")
    (tmp_path / "scan.v3.jpg").write_bytes(b"x")
    path, version = publish_version(tmp_path, "scan", ".tif", writer(b"new"))
    assert (path.name, version) == ("scan.v4.tif", 4)
    assert existing_versions(tmp_path, "scan") == {1, 3, 4}
    assert existing_versions(tmp_path, "scan.v1") == set()


def test_a_failed_write_leaves_no_file_behind(tmp_path):
    def broken(path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_version(tmp_path, "scan", ".png", broken)
    assert list(tmp_path.iterdir()) == []


def test_no_temporary_file_remains_after_publishing(tmp_path):
    publish_version(tmp_path, "scan", ".png", writer(b"ok"))
    assert not [p for p in tmp_path.iterdir() if TEMP_MARKER in p.name]


def test_minimum_version_is_respected(tmp_path):
    _, version = publish_version(tmp_path, "scan", ".png", writer(b"ok"), minimum=5)
    assert version == 5
