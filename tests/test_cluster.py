"""Several machines, for real: a Redis started here, a coordinator daemon and `scanrestore
worker` processes (each with its own model cache, seeing the shared folders under another path
than the coordinator), and the exactly-once promise under the failures the issue lists."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from clusterkit import NO_REDIS, REDIS_SERVER, Cluster, RedisServer, wait_for
from conftest import shared_file
from modelfactory import nearest_compact, tiny_compact
from PIL import Image

from daemon.cli import main

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=NO_REDIS)

BIRD = "corpus/sr_benchmark/Set5/HR/bird.png"
BARBARA = "corpus/sr_benchmark/Set14/HR/barbara.png"  # 720x576: room for larger scans


@pytest.fixture
def redis(tmp_path: Path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fast_model(tmp_path_factory) -> Path:
    return nearest_compact(tmp_path_factory.mktemp("model") / "fast.pth", scale=2)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    """Seconds per image on one thread: long enough to act on a worker mid-job."""
    return tiny_compact(
        tmp_path_factory.mktemp("model") / "slow.pth", scale=2, num_feat=64, num_conv=16
    )


@pytest.fixture
def cluster(tmp_path: Path, redis: RedisServer):
    made: list[Cluster] = []

    def make(model: Path, **options: object) -> Cluster:
        made.append(Cluster(tmp_path / "site", redis, model, **options))
        return made[-1]

    yield make
    for item in made:
        item.stop_all()
        for name in ["coordinator", *(f"worker-{w}" for w in item.workers)]:
            print(f"---- {name} (tail; pytest shows it when the test failed)")
            print(item.log(name)[-4000:])


def drop(
    site: Cluster, count: int, size: int = 48, start: int = 0, image: str = BIRD
) -> list[Path]:
    """`count` different crops of a corpus image, written whole (renamed into place)."""
    pixels = np.asarray(Image.open(shared_file(image)).convert("RGB"))
    paths = []
    for index in range(start, start + count):
        y, x = divmod(index * 7, max(1, pixels.shape[1] - size))
        crop = pixels[y % (pixels.shape[0] - size) :][:size, x : x + size]
        if crop.shape[0] < size or crop.shape[1] < size:
            crop = np.resize(crop, (size, size, 3))
        folder = site.scans / f"roll{index % 3}"
        folder.mkdir(exist_ok=True)
        temp = folder / f".{index}.part"
        Image.fromarray(np.ascontiguousarray(crop)).save(temp, format="PNG")
        temp.rename(folder / f"scan{index:03d}.png")
        paths.append(folder / f"scan{index:03d}.png")
    return paths


def assert_exactly_once(site: Cluster, sources: list[Path]) -> None:
    """One published image per source, one done run each, no temporary file left."""
    images = site.images()
    stems = sorted(p.relative_to(site.out).as_posix().split(".v")[0] for p in images)
    expected = sorted(p.relative_to(site.scans).with_suffix("").as_posix() for p in sources)
    assert stems == expected, f"published {len(images)} images for {len(sources)} sources"
    runs = site.query("SELECT path, count(*) FROM runs WHERE status = 'done' GROUP BY path")
    assert len(runs) == len(sources) and all(count == 1 for _, count in runs), runs
    assert site.temporaries() == []


def status(site: Cluster, capsys) -> dict:
    capsys.readouterr()
    assert main(["--config", str(site.config), "status", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- the batch


def test_a_batch_is_published_exactly_once_each_with_its_worker_in_the_provenance(
    cluster, fast_model, capsys
):
    site = cluster(fast_model)
    site.start_coordinator()
    site.start_worker("w1")
    site.start_worker("w2")
    sources = drop(site, 32)
    wait_for(lambda: site.done() == 32, 300, "32 jobs done")
    assert_exactly_once(site, sources)
    workers = dict(site.query("SELECT path, worker FROM runs WHERE status = 'done'"))
    idents = {
        beat["name"]: f"{beat['name']}@{beat['host']}:{beat['pid']}"
        for beat in site.beats().values()
    }
    assert set(workers.values()) <= set(idents.values()), workers
    sidecar = json.loads(next(site.out.rglob("*.v1.json")).read_text())
    assert sidecar["worker"] in idents.values()

    def listed() -> dict[str, dict]:
        return {item["name"]: item for item in status(site, capsys)["workers"]}

    wait_for(lambda: sum(w["jobs_done"] for w in listed().values()) == 32, 30, "status: 32 done")
    assert set(listed()) == {"w1", "w2"}
    assert all(item["host"] and item["device"] == "cpu" for item in listed().values())
    assert all(item["last_heartbeat_at"] and item["state"] == "idle" for item in listed().values())


# ---------------------------------------------------------------- failures


def busy_worker(site: Cluster) -> str | None:
    """The name of a worker whose heartbeat says it runs a job."""
    return next((name for name, beat in site.beats().items() if beat["run_token"]), None)


def test_a_worker_killed_mid_job_leaves_the_job_to_the_other_one_output(cluster, slow_model):
    site = cluster(slow_model)
    site.start_coordinator()
    site.start_worker("w1")
    site.start_worker("w2")
    sources = drop(site, 1, size=320)
    wait_for(lambda: busy_worker(site), 120, "a worker to take the scan")
    victim = busy_worker(site)
    site.workers[victim].send_signal(signal.SIGKILL)
    site.workers[victim].wait(30)
    wait_for(lambda: site.done() == 1, 240, "the job done by the other worker")
    assert_exactly_once(site, sources)
    ((maker,),) = site.query("SELECT worker FROM runs WHERE status = 'done'")
    survivor = ({"w1", "w2"} - {victim}).pop()
    assert maker.startswith(f"{survivor}@")
    ((error,),) = site.query("SELECT error FROM runs WHERE status = 'died'")
    assert f"cluster worker {victim} stopped sending heartbeats" in error


def test_a_job_longer_than_the_visibility_timeout_runs_once(cluster, slow_model):
    site = cluster(slow_model, visibility_timeout=1.0)
    site.start_coordinator()
    site.start_worker("w1")
    site.start_worker("w2")
    sources = drop(site, 1, size=320)
    wait_for(lambda: site.done() == 1, 240, "the long job done")
    # Redis handed the unacknowledged message out again after 1 s; the copy was dropped.
    wait_for(
        lambda: sum(beat["duplicates"] for beat in site.beats().values()) >= 1,
        60,
        "the redelivered message to be dropped",
    )
    assert_exactly_once(site, sources)
    assert site.query("SELECT count(*) FROM runs") == [(1,)]
    assert "discarded result" not in site.log("coordinator")


def test_a_worker_with_tampered_weights_refuses_every_task_and_the_others_take_them(
    cluster, fast_model, capsys
):
    site = cluster(fast_model)
    site.start_coordinator()
    site.start_worker("bad", tampered=True)
    sources = drop(site, 1)

    def bad() -> dict:
        return next((w for w in status(site, capsys)["workers"] if w["name"] == "bad"), {})

    wait_for(lambda: bad().get("state") == "refusing", 120, "the tampered worker refusing")
    site.start_worker("good")
    sources += drop(site, 5, start=1)
    wait_for(lambda: site.done() == 6, 240, "every job done by the good worker")
    assert_exactly_once(site, sources)
    makers = {worker for (worker,) in site.query("SELECT worker FROM runs")}
    assert all(maker.startswith("good@") for maker in makers), makers
    assert "sha256" in bad()["error"] and "tiny" in bad()["error"]
    assert site.beats()["bad"]["done"] == 0


def test_a_worker_started_mid_batch_takes_work_and_sigterm_hands_its_job_back(cluster, slow_model):
    site = cluster(slow_model)
    site.start_coordinator()
    site.start_worker("w1")
    # 512 px scans: a job lasts seconds, not the fraction of one that a 320 px scan takes
    # where `auto` finds a fast engine, so the SIGTERM lands while the late worker's job runs.
    sources = drop(site, 8, size=512, image=BARBARA)
    wait_for(lambda: busy_worker(site) == "w1", 120, "w1 to take a scan")
    late = site.start_worker("late")
    wait_for(lambda: site.beats().get("late", {}).get("run_token"), 120, "the late worker busy")
    late.send_signal(signal.SIGTERM)
    assert late.wait(60) == 0
    assert "late" not in site.beats()
    wait_for(lambda: site.done() == 8, 300, "the batch done")
    assert_exactly_once(site, sources)
    assert site.query("SELECT count(*) FROM runs WHERE status != 'done'") == [(0,)]
    assert "the worker is stopping" in site.log("coordinator")


def test_the_coordinator_killed_and_restarted_while_workers_run_leaves_no_duplicate(
    cluster, slow_model
):
    site = cluster(slow_model)
    site.start_coordinator()
    site.start_worker("w1")
    site.start_worker("w2")
    sources = drop(site, 4, size=160)
    wait_for(lambda: busy_worker(site), 120, "a worker busy")
    site.coordinator.kill()
    site.coordinator.wait(30)
    site.start_coordinator()
    wait_for(lambda: site.done() == 4, 300, "the batch done after the restart")
    assert_exactly_once(site, sources)


def test_redis_restarted_mid_batch_loses_no_job_and_duplicates_none(cluster, slow_model, redis):
    site = cluster(slow_model)
    site.start_coordinator()
    site.start_worker("w1")
    site.start_worker("w2")
    sources = drop(site, 5, size=128)
    wait_for(lambda: site.done() >= 1 and busy_worker(site), 180, "the batch under way")
    redis.stop()
    redis.start()
    wait_for(lambda: site.done() == 5, 300, "the batch done after the broker restart")
    assert_exactly_once(site, sources)


def test_a_worker_presumed_dead_that_comes_back_publishes_nothing(cluster, slow_model):
    """SIGSTOP freezes a worker mid-job past the worker timeout: the coordinator revokes its
    run and gives the job to the other worker. Woken, the frozen worker finds its run revoked
    and stops it (or, had it finished, its late result is discarded): one output, no
    temporary file left."""
    site = cluster(slow_model)
    site.start_coordinator()
    site.start_worker("w1")
    site.start_worker("w2")
    sources = drop(site, 1, size=320)
    wait_for(lambda: busy_worker(site), 120, "a worker to take the scan")
    frozen = busy_worker(site)
    site.workers[frozen].send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: site.done() == 1, 240, "the job done by the other worker")
    finally:
        site.workers[frozen].send_signal(signal.SIGCONT)
    wait_for(
        lambda: (
            "revoked by the coordinator" in site.log(f"worker-{frozen}")
            or "discarded result" in site.log("coordinator")
        ),
        60,
        "the woken worker's run stopped or its result discarded",
    )
    wait_for(lambda: site.temporaries() == [], 30, "no temporary file left")
    assert_exactly_once(site, sources)
    ((maker,),) = site.query("SELECT worker FROM runs WHERE status = 'done'")
    assert not maker.startswith(f"{frozen}@")
