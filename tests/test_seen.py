"""Already seen: the rule, the versions a real database vouches for at start-up, and a real
watcher restarted over real files that hands over exactly the changed ones."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.queue import JobQueue
from daemon.seen import Version, already_seen, hash_if_seen, recorded_version, seen_versions
from daemon.store import Store, open_database
from daemon.watcher import ReadyFile, Watcher
from pipeline.files import sha256_file

RECIPE = {"stages": [{"stage": "upscale", "version": 1}], "code_version": "0.1.0"}
OTHER_RECIPE = {"stages": [{"stage": "upscale", "version": 2}], "code_version": "0.1.0"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    with open_database(tmp_path / "state" / "scanrestore.db") as store:
        yield store


def observe(store: Store, root: Path, name: str) -> str:
    """Record `name` as the daemon's ingest does: its hash with the version it was read from."""
    path = root / name
    info = path.stat()
    sha = sha256_file(path)
    store.record_observation(
        name, sha, size=info.st_size, mtime_ns=info.st_mtime_ns, inode=info.st_ino
    )
    return sha


def process(store: Store, queue: JobQueue, root: Path, name: str, recipe: str) -> None:
    """Hashed, queued, claimed and done: what a finished run leaves in the queue."""
    queue.enqueue(name, observe(store, root, name), recipe)
    queue.complete(queue.claim("test"))


def test_a_version_is_seen_only_when_size_mtime_and_inode_all_match():
    recorded = Version(size=10, mtime_ns=5, inode=7)
    assert already_seen(recorded, Version(10, 5, 7))
    assert not already_seen(None, recorded)
    assert not already_seen(recorded, Version(11, 5, 7))
    assert not already_seen(recorded, Version(10, 6, 7))
    assert not already_seen(recorded, Version(10, 5, 8))


def test_an_observation_without_mtime_and_inode_or_of_a_removal_gives_no_version(store, tmp_path):
    (tmp_path / "a.tif").write_bytes(b"scan")
    sha = observe(store, tmp_path, "a.tif")
    info = (tmp_path / "a.tif").stat()
    latest = store.latest_observation("a.tif")
    assert recorded_version(latest) == Version.of(info)
    assert hash_if_seen(latest, Version.of(info)) == sha
    assert hash_if_seen(latest, Version.of(info)._replace(inode=info.st_ino + 1)) is None
    old = store.record_observation("old.tif", sha, size=4)  # as rows before 0004 were written
    assert recorded_version(old) is None
    assert recorded_version(store.record_removal("a.tif")) is None
    assert recorded_version(None) is None


def test_the_database_vouches_for_paths_whose_bytes_need_nothing_more_under_the_recipe(
    store, tmp_path
):
    for name in ("done.tif", "queued.tif", "hashed-only.tif", "gone.tif", "old.tif"):
        (tmp_path / name).write_bytes(name.encode())
    shutil.copy(tmp_path / "done.tif", tmp_path / "copy of done.tif")
    queue = JobQueue(store)
    recipe = store.record_recipe(RECIPE)
    process(store, queue, tmp_path, "done.tif", recipe)
    queue.enqueue("queued.tif", observe(store, tmp_path, "queued.tif"), recipe)
    observe(store, tmp_path, "copy of done.tif")  # the same bytes under another name
    observe(store, tmp_path, "hashed-only.tif")  # a crash between hashing and queueing
    process(store, queue, tmp_path, "gone.tif", recipe)
    store.record_removal("gone.tif")
    old_sha = sha256_file(tmp_path / "old.tif")
    store.record_observation("old.tif", old_sha, size=7)  # a row from before 0004
    queue.enqueue("old.tif", old_sha, recipe)

    seeded = seen_versions(store, queue, recipe)
    assert seeded == {
        name: Version.of((tmp_path / name).stat())
        for name in ("copy of done.tif", "done.tif", "queued.tif")
    }
    assert seen_versions(store, queue, store.record_recipe(OTHER_RECIPE)) == {}


def _watch(root: Path, known: dict[str, Version]) -> list[ReadyFile]:
    """One start-up of a watcher over `root`: everything it hands over once settled."""
    clock, ready = FakeClock(), []
    watcher = Watcher(
        root,
        ready.append,
        mode="polling",
        stable_seconds=1.0,
        poll_seconds=1e9,
        tick_seconds=1e9,
        known=known,
        clock=clock,
    )
    watcher.step()
    clock.now += 5.0
    watcher.step()
    watcher.stop()
    return ready


def test_a_restarted_watcher_hands_over_only_files_touched_or_replaced_since(store, tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    names = ("same.tif", "touched.tif", "replaced.tif")
    for name in names:
        (root / name).write_bytes(f"the bytes of {name}".encode())
    queue, recipe = JobQueue(store), store.record_recipe(RECIPE)
    for name in names:
        process(store, queue, root, name, recipe)
    assert _watch(root, seen_versions(store, queue, recipe)) == []

    touched = (root / "touched.tif").stat()
    (root / "touched.tif").write_bytes(b"the bytes of touched.tif")  # rewritten, same bytes
    os.utime(root / "touched.tif", ns=(touched.st_atime_ns, touched.st_mtime_ns + 10**9))
    before = (root / "replaced.tif").stat()
    copy = root / ".replacement"
    shutil.copy(root / "replaced.tif", copy)  # another inode, then the same size and mtime
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(copy, root / "replaced.tif")
    after = (root / "replaced.tif").stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ino != before.st_ino

    handed = _watch(root, seen_versions(store, queue, recipe))
    assert sorted((entry.relative, entry.inode) for entry in handed) == [
        ("replaced.tif", after.st_ino),
        ("touched.tif", touched.st_ino),
    ]


def test_an_observation_records_the_version_and_a_new_inode_alone_is_a_new_observation(
    store,
):
    moment = datetime(2024, 5, 1, tzinfo=UTC)
    first = store.record_observation(
        "a.tif", "a" * 64, size=4, modified_at=moment, mtime_ns=5, inode=7
    )
    assert (first.mtime_ns, first.inode) == (5, 7)
    repeat = store.record_observation(
        "a.tif", "a" * 64, size=4, modified_at=moment, mtime_ns=5, inode=7
    )
    moved = store.record_observation(
        "a.tif", "a" * 64, size=4, modified_at=moment, mtime_ns=5, inode=8
    )
    assert repeat.id == first.id and moved.id != first.id
    assert [o.inode for o in store.observations("a.tif")] == [7, 8]
    assert [o.path for o in store.latest_observations()] == ["a.tif"]
    assert next(iter(store.latest_observations())).inode == 8
