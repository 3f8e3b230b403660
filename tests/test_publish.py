"""Publication: versions never reused, links never replacing, the plan's JSON form, and the
recovery of a publication cut short at each step. Real folders, a real SQLite file."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.publish import (
    TEMP_MARKER,
    Finished,
    Plan,
    PublicationError,
    Publisher,
    existing_versions,
    link_all,
    next_version,
    plan_files,
    publish_files,
    remove_stray_temps,
    write_temp,
)
from daemon.queue import JobQueue
from daemon.store import open_database
from pipeline.files import link_no_replace, sha256_file

SOURCE_SHA = "a" * 64
STAGES = ({"stage": "upscale", "version": 1, "params": {"scale": 2}, "seconds": 0.5},)
STARTED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def writer(content: bytes):
    return lambda path: path.write_bytes(content)


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if TEMP_MARKER in p.name)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_MARKER not in p.name)


# ---------------------------------------------------------------- versions and links


def test_versions_count_up_and_files_are_never_overwritten(tmp_path):
    (first,) = publish_files(
        tmp_path, "scan", [write_temp(tmp_path, "scan", "image", ".tif", writer(b"one"))]
    )
    (second,) = publish_files(
        tmp_path, "scan", [write_temp(tmp_path, "scan", "image", ".tif", writer(b"two"))]
    )
    assert (first.final.name, first.version) == ("scan.v1.tif", 1)
    assert (second.final.name, second.version) == ("scan.v2.tif", 2)
    assert first.final.read_bytes() == b"one" and second.final.read_bytes() == b"two"
    assert temps(tmp_path) == []


def test_a_version_taken_under_another_suffix_or_recorded_is_not_reused(tmp_path):
    (tmp_path / "scan.v1.png").write_bytes(b"x")
    (tmp_path / "scan.v3.jpg").write_bytes(b"x")
    assert next_version(tmp_path, "scan", [".tif"]) == 4
    assert next_version(tmp_path, "scan", [".tif"], recorded={9}) == 10  # its files deleted
    (tmp_path / "scan.v4.mask.png").write_bytes(b"x")  # a sidecar alone still holds v4
    assert next_version(tmp_path, "scan", [".tif", ".mask.png"]) == 5
    assert existing_versions(tmp_path, "scan") == {1, 3}
    assert existing_versions(tmp_path, "scan.v1") == set()


def test_a_failed_write_leaves_no_file_behind(tmp_path):
    def broken(path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_temp(tmp_path, "scan", "image", ".png", broken)
    assert list(tmp_path.iterdir()) == []


def test_a_link_never_replaces_and_undoes_its_own_links_when_one_name_is_taken(tmp_path):
    image = write_temp(tmp_path, "scan", "image", ".png", writer(b"image"))
    mask = write_temp(tmp_path, "scan", "mask", ".mask.png", writer(b"mask"))
    (tmp_path / "scan.v1.mask.png").write_bytes(b"someone else's")
    planned = plan_files([image, mask], tmp_path, ".", "scan", 1)
    with pytest.raises(FileExistsError):
        link_all(planned)
    assert (tmp_path / "scan.v1.mask.png").read_bytes() == b"someone else's"
    assert not (tmp_path / "scan.v1.png").exists()  # linked first, removed again
    assert image.temp.exists() and mask.temp.exists()  # the caller's to retry or remove


def test_files_published_together_move_on_together_past_a_taken_name(tmp_path, monkeypatch):
    image = write_temp(tmp_path, "scan", "image", ".png", writer(b"image"))
    mask = write_temp(tmp_path, "scan", "mask", ".mask.png", writer(b"mask"))
    real_link = link_no_replace

    def racing_link(temp, final):  # another writer takes v1's mask name in between
        if Path(final).name == "scan.v1.mask.png":
            Path(final).write_bytes(b"raced")
        return real_link(temp, final)

    monkeypatch.setattr("daemon.publish.link_no_replace", racing_link)
    published = publish_files(tmp_path, "scan", [image, mask])
    assert [item.final.name for item in published] == ["scan.v2.png", "scan.v2.mask.png"]
    assert names(tmp_path) == ["scan.v1.mask.png", "scan.v2.mask.png", "scan.v2.png"]
    assert temps(tmp_path) == []


# ---------------------------------------------------------------- the plan


def _plan(folder: Path) -> Plan:
    image = write_temp(folder, "scan", "image", ".png", writer(b"image"))
    return Plan("0123abcd", STARTED, "cpu", STAGES, plan_files([image], folder, "album", "scan", 3))


def test_a_plan_round_trips_through_its_json_form(tmp_path):
    plan = _plan(tmp_path)
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    data = json.loads(text)
    assert set(data) == {"run_token", "started_at", "device", "stages", "files", "worker"}
    assert set(data["files"][0]) == {
        "kind", "temp", "suffix", "sha256", "bytes", "final", "relative", "version",
    }  # fmt: skip
    assert data["files"][0]["relative"] == "album/scan.v3.png"
    assert text == json.dumps(data, sort_keys=True, separators=(",", ":"))  # canonical


def test_a_plan_recorded_by_the_previous_daemon_still_reads(tmp_path):
    """The JSON form is what daemon/service.py recorded before it had a Plan class."""
    text = (
        '{"device":"cpu","files":[{"bytes":5,"final":"/o/a/s.v2.png","kind":"image",'
        '"relative":"a/s.v2.png","sha256":"' + "b" * 64 + '","suffix":".png",'
        '"temp":"/o/a/._s.png.tmp-01234567","version":2}],"run_token":"feed",'
        '"stages":[],"started_at":"2026-01-02T03:04:05+00:00"}'
    )
    plan = Plan.from_json(text)
    assert (plan.version, plan.run_token, plan.started_at) == (2, "feed", STARTED)
    (output,) = plan.outputs()
    assert (output.path, output.version, output.bytes, output.kind) == ("a/s.v2.png", 2, 5, "image")


# ---------------------------------------------------------------- publishing and recovery


class Site:
    """A database with one running job for `album/scan.png`, and an output folder."""

    def __init__(self, root: Path) -> None:
        self.db = root / "state.db"
        self.out = root / "out"
        self.dest = self.out / "album"
        self.dest.mkdir(parents=True)
        store = open_database(self.db)
        store.record_observation("album/scan.png", SOURCE_SHA, size=10)
        self.recipe = store.record_recipe({"stages": ["upscale"]})
        queue = JobQueue(store)
        queue.enqueue("album/scan.png", SOURCE_SHA, self.recipe)
        self.job = queue.claim("test")
        store.close()

    def publisher(self, *, sidecar: bool = True) -> Publisher:
        """A publisher over a connection of its own: each one plays a fresh daemon process."""
        store = open_database(self.db)
        return Publisher(store, JobQueue(store), code_version="9.9", provenance_sidecar=sidecar)

    def finished(self) -> Finished:
        image = write_temp(self.dest, "scan", "image", ".png", writer(b"restored image"))
        mask = write_temp(self.dest, "scan", "mask", ".mask.png", writer(b"invented pixels"))
        return Finished(
            self.job, "0123abcd", STARTED, self.dest, "scan", (image, mask), STAGES, "cpu"
        )

    def runs(self) -> list[tuple]:
        store = open_database(self.db)
        try:
            return store.conn.execute("SELECT status, run_token FROM runs").fetchall()
        finally:
            store.close()

    def state(self) -> tuple[str, bool]:
        store = open_database(self.db)
        try:
            return store.conn.execute("SELECT state, publishing IS NOT NULL FROM jobs").fetchone()
        finally:
            store.close()


@pytest.fixture
def site(tmp_path) -> Site:
    return Site(tmp_path)


def test_a_publication_links_every_file_at_one_version_and_records_the_run(site):
    publisher = site.publisher()
    plan = publisher.publish(site.finished())
    assert names(site.dest) == ["scan.v1.json", "scan.v1.mask.png", "scan.v1.png"]
    assert temps(site.out) == []
    assert site.state() == ("done", False) and site.runs() == [("done", "0123abcd")]
    sidecar = json.loads((site.dest / "scan.v1.json").read_text())
    assert sidecar["run_id"] == "0123abcd" and sidecar["recipe"] == {"stages": ["upscale"]}
    assert [o["name"] for o in sidecar["outputs"]] == ["scan.v1.png", "scan.v1.mask.png"]
    recorded = {
        o.path: o.output_sha256 for o in publisher.store.history("album/scan.png")[0].outputs
    }
    assert recorded == {f.relative: sha256_file(f.final) for f in plan.files}
    assert publisher.store.recorded_versions("album/scan") == {1}


def test_a_recorded_version_is_not_reused_after_its_files_were_deleted(site):
    site.publisher().publish(site.finished())
    for path in site.dest.iterdir():
        path.unlink()
    store = open_database(site.db)
    queue = JobQueue(store)
    queue.enqueue("album/scan.png", SOURCE_SHA, site.recipe, force=True)
    site.job = queue.claim("test")
    store.close()
    plan = site.publisher(sidecar=False).publish(site.finished())
    assert plan.version == 2 and names(site.dest) == ["scan.v2.mask.png", "scan.v2.png"]


def test_a_filesystem_failure_leaves_nothing_published_and_no_plan(site):
    publisher = site.publisher()
    finished = site.finished()
    long_stem = "x" * 250  # the final names are too long for the filesystem: ENAMETOOLONG
    finished = Finished(site.job, "t", STARTED, site.dest, long_stem, finished.files, STAGES, None)
    with pytest.raises(PublicationError) as info:
        publisher.publish(finished)
    assert isinstance(info.value.cause, OSError)
    assert list(site.dest.iterdir()) == []
    assert site.state() == ("running", False) and site.runs() == []


def _crash(site: Site, step: str) -> None:
    """Publisher.publish by hand, stopped where a SIGKILL could stop it."""
    publisher = site.publisher(sidecar=False)
    finished = site.finished()
    if step == "written":
        return
    planned = plan_files(finished.files, site.dest, "album", "scan", 1)
    plan = Plan(finished.run_token, STARTED, "cpu", STAGES, planned)
    publisher.queue.record_plan(site.job, plan.to_json())
    if step == "recorded":
        return
    link_no_replace(planned[0].temp, planned[0].final)
    if step == "one linked":
        return
    link_no_replace(planned[1].temp, planned[1].final)
    for item in planned:
        item.temp.unlink()
    assert step == "all linked"


@pytest.mark.parametrize("step", ["recorded", "one linked", "all linked"])
def test_recovery_finishes_a_recorded_plan_exactly_once(site, step):
    _crash(site, step)
    assert [job.id for job in site.publisher().recover()] == [site.job.id]
    assert [job.id for job in site.publisher().recover()] == []  # a second start: nothing
    assert names(site.dest) == ["scan.v1.mask.png", "scan.v1.png"]
    assert (site.dest / "scan.v1.png").read_bytes() == b"restored image"
    assert temps(site.out) == []
    assert site.state() == ("done", False) and site.runs() == [("done", "0123abcd")]


def test_a_crash_before_the_plan_leaves_only_temporary_files_which_the_start_removes(site):
    _crash(site, "written")
    assert site.publisher().recover() == []
    assert remove_stray_temps(site.out) == 2
    assert list(site.dest.iterdir()) == [] and site.runs() == []
    assert site.state() == ("running", False)  # the queue requeues the dead daemon's lease


def test_recovery_rolls_back_a_plan_whose_files_cannot_all_be_linked(site):
    _crash(site, "one linked")
    next(site.dest.glob(f"._scan.mask.png{TEMP_MARKER}*")).unlink()  # lost meanwhile
    assert site.publisher().recover() == []
    assert site.publisher().recover() == []
    assert list(site.dest.iterdir()) == []  # the image linked before the crash is gone too
    assert site.state() == ("running", False) and site.runs() == []
