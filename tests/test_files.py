"""pipeline.files: hashing, durable replacement, linking without replacing."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from pipeline.files import (
    fsync_dir,
    link_no_replace,
    sha256_file,
    temp_beside,
    write_atomically,
)


def test_sha256_file_matches_hashlib_and_refuses_a_symlink_when_asked(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # several read chunks
    target = tmp_path / "a.bin"
    target.write_bytes(data)
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    assert sha256_file(target) == hashlib.sha256(data).hexdigest()
    assert sha256_file(link) == hashlib.sha256(data).hexdigest()
    with pytest.raises(OSError):
        sha256_file(link, follow_symlinks=False)


def test_link_no_replace_never_replaces_an_existing_file(tmp_path: Path) -> None:
    temp, final = tmp_path / "t", tmp_path / "f"
    temp.write_bytes(b"new")
    final.write_bytes(b"old")
    assert link_no_replace(temp, final) is False
    assert final.read_bytes() == b"old" and temp.exists()
    final.unlink()
    assert link_no_replace(temp, final) is True
    assert final.read_bytes() == b"new"


def test_link_no_replace_falls_back_to_rename_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> None:
        raise OSError(errno.EPERM, "no hard links on this share")

    monkeypatch.setattr(os, "link", refuse)
    temp, final = tmp_path / "t", tmp_path / "f"
    temp.write_bytes(b"new")
    assert link_no_replace(temp, final) is True
    assert final.read_bytes() == b"new" and not temp.exists()
    temp.write_bytes(b"newer")
    assert link_no_replace(temp, final) is False
    assert final.read_bytes() == b"new"


def test_temp_beside_is_removed_when_the_write_fails(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "model.pth"
    with pytest.raises(RuntimeError), temp_beside(final) as (temp, handle):
        handle.write(b"partial")
        assert temp.parent == final.parent and temp.name.startswith(".model.pth.")
        raise RuntimeError("download broke")
    assert list(final.parent.iterdir()) == []


def test_write_atomically_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "catalogue.json"
    path.write_bytes(b"old contents")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["catalogue.json"]
    fsync_dir(tmp_path / "missing")  # a folder that cannot be opened is not an error
