"""The HTTP API and /metrics through a real `scanrestore serve` process over a state folder a real
daemon made: every endpoint, every refusal a clean 4xx that changes nothing (in the database or
on disk), the token rule for a non-loopback bind, metrics equal to the database, and review
decisions from the CLI shown by `history` and carried into the next version's sidecar."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from webserver import REPO, State, server

from daemon.web.openapi import OPENAPI

TOKEN = "a-test-token-of-32-characters-xx"


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> State:
    """Three scans (one scratched, so a mask; one not an image), then a copy of a done one."""
    site = State(tmp_path_factory.mktemp("web"))
    site.drop_scratched("album/scratched.png")
    site.drop("bird.png")
    (site.scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    assert site.once() == 1  # broken.png failed (and is quarantined: max_attempts 1)
    site.drop("copies/bird-again.png")
    assert site.once() == 0
    assert site.scalar("SELECT count(*) FROM events WHERE kind = 'duplicate'") == 1
    return site


@pytest.fixture(scope="module")
def url(state: State):
    with server(state) as base:
        yield base


def _browser(url: str) -> httpx.Client:
    """A client holding the CSRF cookie a page sets, sending it back as the header."""
    client = httpx.Client(base_url=url, timeout=60)
    assert client.get("/review").status_code == 200
    client.headers["x-csrf-token"] = client.cookies["scanrestore_csrf"]
    client.headers["origin"] = url
    return client


def _image_id(state: State, path: str) -> int:
    return int(state.scalar("SELECT id FROM outputs WHERE path = ? AND kind = 'image'", path))


def test_status_and_outputs_show_what_the_database_holds(state, url):
    status = httpx.get(f"{url}/api/status").json()
    with state.db() as db:
        counts = dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    assert {k: v for k, v in status["counts"].items() if v} == counts
    assert [q["path"] for q in status["quarantined"]] == ["broken.png"]
    assert (
        status["models"][0]["sha256"]
        == json.loads(state.scalar("SELECT recipe_json FROM recipes ORDER BY rowid DESC LIMIT 1"))[
            "models"
        ][str(state.root / "tiny2x.pth")]
    )
    listed = httpx.get(f"{url}/api/outputs", params={"sort": "invented"}).json()["outputs"]
    assert [o["path"] for o in listed] == ["album/scratched.v1.png", "bird.v1.png"]
    assert listed[0]["invented"] > 0 and listed[1]["invented"] is None
    only = httpx.get(f"{url}/api/outputs", params={"folder": "album", "stage": "upscale"})
    assert [o["path"] for o in only.json()["outputs"]] == ["album/scratched.v1.png"]
    one = httpx.get(f"{url}/api/outputs/{listed[0]['id']}").json()
    assert one["run"]["stages"][1]["model_sha256"] == status["models"][0]["sha256"]
    assert one["source_paths"] == ["album/scratched.png"]
    assert one["size"] == {"output": [1024, 1024], "source": [512, 512]}


def test_previews_are_pngs_of_the_asked_size(state, url):
    output_id = _image_id(state, "album/scratched.v1.png")
    base = f"{url}/api/outputs/{output_id}/image"
    from io import BytesIO

    from PIL import Image

    for layer in ("output", "original", "lanczos", "mask"):
        answer = httpx.get(f"{base}/{layer}", params={"width": 300})
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert Image.open(BytesIO(answer.content)).size == (300, 300)
    crop = httpx.get(f"{base}/output", params={"x": 100, "y": 50, "w": 64, "h": 32})
    assert Image.open(BytesIO(crop.content)).size == (64, 32)


def test_review_reprocess_and_retry_change_the_store_as_asked(state, url):
    output_id = _image_id(state, "bird.v1.png")
    client = _browser(url)
    answer = client.post(
        f"/api/outputs/{output_id}/review", json={"decision": "rejected", "note": "too soft"}
    )
    assert answer.status_code == 200, answer.text
    with state.db() as db:
        row = db.execute("SELECT decision, note FROM reviews WHERE id = ?", (answer.json()["id"],))
        assert row.fetchone() == ("rejected", "too soft")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE reviews SET decision = 'approved'")
    assert client.get(f"/api/outputs/{output_id}").json()["state"] == "rejected"
    queued = client.post(f"/api/outputs/{output_id}/reprocess", json={})
    assert queued.status_code == 200, queued.text
    job = queued.json()["job"]
    assert state.scalar("SELECT state FROM jobs WHERE id = ?", job) == "queued"
    quarantined = state.scalar("SELECT id FROM jobs WHERE state = 'quarantined'")
    retried = client.post(f"/api/jobs/{quarantined}/retry", json={})
    assert retried.status_code == 200, retried.text
    assert state.scalar("SELECT state FROM jobs WHERE id = ?", quarantined) == "queued"


def test_reprocess_with_another_preset_makes_that_presets_version(tmp_path):
    """The daemon runs preset `plain`; a version asked for under preset `bigger` (through the
    API, and through the CLI) is made with bigger's chain and its verified model, and the
    provenance names the preset. A job whose preset's model went missing fails, naming it."""
    from modelfactory import tiny_compact

    from pipeline.files import sha256_file

    site = State(tmp_path)
    bigger = tiny_compact(tmp_path / "tiny4x.pth", scale=4, seed=3)
    plain, model = json.dumps(str(tmp_path / "tiny2x.pth")), json.dumps(str(bigger))
    with site.config.open("a") as config:
        config.write(
            f'[[presets.plain]]\nkind = "upscale"\nmodel = {plain}\nscale = 2.0\n'
            '[[presets.bigger]]\nkind = "restore"\n'
            f'[[presets.bigger]]\nkind = "upscale"\nmodel = {model}\nscale = 4.0\n'
        )
    site.drop("bird.png")
    site.drop("head.png", "corpus/sr_benchmark/Set5/HR/head.png")
    assert site.cli("watch", "--once", "--preset", "plain") == 0
    with server(site) as url:
        client = _browser(url)
        answer = client.post(
            f"/api/outputs/{_image_id(site, 'bird.v1.png')}/reprocess", json={"preset": "bigger"}
        )
        assert answer.status_code == 200, answer.text
    assert site.cli("reprocess", "head.png", "--preset", "bigger") == 0
    assert site.cli("watch", "--once", "--preset", "plain") == 0
    for name in ("bird", "head"):
        sidecar = json.loads((site.out / f"{name}.v2.json").read_text())
        assert sidecar["recipe"]["preset"] == "bigger"
        assert [s["stage"] for s in sidecar["recipe"]["stages"]] == ["restore", "upscale"]
        assert sidecar["recipe"]["models"] == {str(bigger): sha256_file(bigger)}
        with (
            Image.open(site.out / f"{name}.v2.png") as v2,
            Image.open(site.scans / f"{name}.png") as source,
        ):
            assert v2.size == (source.width * 4, source.height * 4)
    first = json.loads((site.out / "bird.v1.json").read_text())["recipe"]
    assert first["preset"] == "plain" and [s["stage"] for s in first["stages"]] == ["upscale"]
    # Through the CLI, with the preset's model gone after the job was queued.
    assert site.cli("reprocess", "head.png", "--preset", "bigger") == 0
    bigger.rename(tmp_path / "elsewhere.pth")
    assert site.cli("watch", "--once", "--preset", "plain") == 1
    assert not (site.out / "head.v3.png").exists()
    error = site.scalar("SELECT last_error FROM jobs WHERE path = 'head.png' ORDER BY id DESC")
    assert "preset bigger" in error and "tiny4x.pth" in error


def test_a_face_stage_run_shows_its_face_crops_before_and_after_with_the_fidelity(tmp_path):
    """A real face stage (the real RetinaFace mobilenet0.25 detector from ../shared, a narrow
    random RestoreFormer of the real architecture) on the corpus's astronaut: the output's
    JSON and page carry the face's box and the fidelity used, and its before/after crops are
    served as PNGs that differ where the face was replaced."""
    from io import BytesIO

    from conftest import shared_file
    from modelfactory import random_restoreformer

    from daemon.web.previews import fit
    from pipeline.models import ModelStore

    detector = shared_file("weights/detection_mobilenet0.25_Final.pth")
    cache = ModelStore(tmp_path / "cache")
    cache.import_file(detector)  # its hash makes it retinaface-mobilenet0.25
    cache.import_file(random_restoreformer(tmp_path / "rf.pth"), model_id="restoreformer-tiny")
    face = {"kind": "face", "model": "restoreformer-tiny", "parser": "", "fidelity": 0.7}
    face["detector"] = "retinaface-mobilenet0.25"
    site = State(tmp_path, stages=[face])
    site.drop("astronaut.png", "corpus/faces/whole_imgs/skimage_astronaut.png")
    assert site.once() == 0
    output_id = _image_id(site, "astronaut.v1.png")
    with server(site) as url:
        one = httpx.get(f"{url}/api/outputs/{output_id}").json()
        assert [f["fidelity"] for f in one["faces"]] == [0.7]
        x, y, w, h = one["faces"][0]["box"]
        # Where the real detector finds the astronaut's face (tests/test_face.py), 512x512.
        assert abs(x - 177) <= 3 and abs(y - 56) <= 3 and abs(w - 93) <= 4 and abs(h - 120) <= 4
        page = httpx.get(f"{url}/outputs/{output_id}").text
        assert 'id="faces"' in page and "fidelity 0.7" in page
        crops = {}
        for layer in ("lanczos", "output"):
            src = f"/api/outputs/{output_id}/image/{layer}?x={x}&amp;y={y}&amp;w={w}&amp;h={h}"
            src += "&amp;width=160"
            assert src in page
            answer = httpx.get(url + src.replace("&amp;", "&"))
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
            crops[layer] = np.asarray(Image.open(BytesIO(answer.content)).convert("RGB"))
    width, height = fit(w, h, 160)
    assert crops["lanczos"].shape == crops["output"].shape == (height, width, 3)
    assert np.abs(crops["lanczos"].astype(int) - crops["output"]).mean() > 5


def test_every_api_route_is_in_the_openapi_document(url):
    served = httpx.get(f"{url}/api/openapi.json").json()
    assert served == json.loads(json.dumps(OPENAPI))
    from daemon.config import Config
    from daemon.web.app import create_app
    from daemon.web.views import Roots

    app = create_app(Config(), Roots(REPO, REPO, REPO / "nowhere"), token="", host="127.0.0.1")
    routes = {r.path.replace(":int", "") for r in app.routes if r.path.startswith("/api/")}
    assert routes == set(served["paths"])


REFUSALS = [
    # (method, path, body or None, extra headers, expected status)
    ("GET", "/api/outputs/999999", None, {}, 404),
    ("GET", "/api/outputs/999999/image/output", None, {}, 404),
    ("GET", "/outputs/999999", None, {}, 404),
    ("GET", "/api/outputs/1/image/..%2f..%2fetc%2fpasswd", None, {}, 404),
    ("GET", "/api/outputs/%2e%2e%2fconfig.toml", None, {}, 404),
    ("GET", "/api/outputs/1/image/output?x=0&y=0&w=99999&h=1", None, {}, 400),
    ("GET", "/api/outputs/1/image/output?x=-1&y=0&w=1&h=1", None, {}, 400),
    ("GET", "/api/outputs/1/image/output?path=/etc/passwd", None, {}, 400),
    ("GET", "/api/outputs?state=everything", None, {}, 400),
    ("GET", "/api/outputs?folder=../../etc&path=/etc/passwd", None, {}, 400),
    ("GET", "/static/../../daemon/config.py", None, {}, 404),
    ("GET", "/static/%2e%2e/%2e%2e/pyproject.toml", None, {}, 404),
    ("GET", "/etc/passwd", None, {}, 404),
    ("POST", "/api/outputs/1/review", '{"decision": "approved"', {}, 400),
    ("POST", "/api/outputs/1/review", "[1, 2]", {}, 400),
    ("POST", "/api/outputs/1/review", '{"decision": "maybe"}', {}, 422),
    ("POST", "/api/outputs/1/review", '{"decision": "approved", "path": "/x"}', {}, 422),
    ("POST", "/api/outputs/1/review", '{"decision": "approved", "note": 5}', {}, 422),
    ("POST", "/api/outputs/999999/review", '{"decision": "approved"}', {}, 404),
    ("POST", "/api/outputs/1/review", '{"decision": "approved"}', {"content-type": "text/plain"},
     415),
    ("POST", "/api/outputs/1/review", json.dumps({"decision": "approved", "note": "x" * 70000}),
     {}, 413),
    ("POST", "/api/outputs/1/reprocess", '{"preset": "../../etc/passwd"}', {}, 422),
    ("POST", "/api/outputs/1/reprocess", '{"preset": "archival"}', {}, 409),  # models absent
    ("POST", "/api/jobs/999999/retry", "{}", {}, 404),
    ("POST", "/api/jobs/1/retry", "{}", {}, 409),  # a done job
    # CSRF: no header, a wrong header, another origin
    ("POST", "/api/outputs/1/review", '{"decision": "approved"}', {"x-csrf-token": ""}, 403),
    ("POST", "/api/outputs/1/review", '{"decision": "approved"}', {"x-csrf-token": "f" * 32},
     403),
    ("POST", "/api/outputs/1/review", '{"decision": "approved"}',
     {"origin": "http://evil.example"}, 403),
    ("GET", "/api/status", None, {"host": "evil.example"}, 400),
]  # fmt: skip


def test_every_wrong_request_is_a_clean_4xx_that_changes_nothing(state, url):
    client = _browser(url)
    client.get("/api/outputs/1/image/output")  # previews exist before (the cache is not state)
    before = state.fingerprint()
    for method, path, body, headers, status in REFUSALS:
        sent = {"content-type": "application/json", **headers}
        answer = client.request(method, path, content=body, headers=sent)
        assert answer.status_code == status, (method, path, headers, answer.text)
        if path.startswith("/api/"):
            assert "error" in answer.json(), (path, answer.text)
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert state.fingerprint() == before


def test_pages_send_security_headers_and_no_inline_script(url):
    for path in ("/", "/review", "/outputs/1"):
        answer = httpx.get(f"{url}{path}")
        assert answer.status_code == 200, path
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert "<script>" not in answer.text and "http://" not in answer.text.split("</head>")[0]


def test_a_non_loopback_bind_refuses_to_start_without_a_token(state):
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(state.config), "serve",
         "--host", "0.0.0.0", "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(state.root)},
    )  # fmt: skip
    assert done.returncode == 2
    assert "requires a token" in done.stderr and "SCANRESTORE_WEB_TOKEN" in done.stderr


def test_with_a_token_every_request_needs_it(state):
    before = state.fingerprint()
    with server(state, host="0.0.0.0", env={"SCANRESTORE_WEB_TOKEN": TOKEN}) as url:
        review = {"decision": "approved"}
        assert httpx.get(f"{url}/api/status").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/").status_code == 303  # to the sign-in form
        wrong = {"authorization": "Bearer " + "x" * 32}
        assert httpx.get(f"{url}/api/status", headers=wrong).status_code == 401
        assert httpx.post(f"{url}/api/outputs/1/review", json=review).status_code == 401
        assert (
            httpx.post(f"{url}/api/outputs/1/review", json=review, headers=wrong).status_code == 401
        )
        assert state.fingerprint() == before
        right = {"authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{url}/api/status", headers=right).status_code == 200
        # A signed-in browser: the session cookie, and still the CSRF check on a change.
        with httpx.Client(base_url=url) as browser:
            assert browser.post("/login", data={"token": TOKEN}).status_code == 303
            assert browser.get("/api/status").status_code == 200
            assert browser.post("/api/outputs/1/review", json=review).status_code == 403
            browser.get("/review")
            csrf = {"x-csrf-token": browser.cookies["scanrestore_csrf"]}
            assert (
                browser.post("/api/outputs/1/review", json=review, headers=csrf).status_code == 200
            )
        answer = httpx.post(f"{url}/api/outputs/1/review", json=review, headers=right)
        assert answer.status_code == 200
    assert (
        state.scalar("SELECT count(*) FROM reviews WHERE output_id = 1 AND decision = 'approved'")
        >= 2
    )


def test_metrics_parse_and_equal_the_database(state, url):
    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name: str, **labels: str) -> float:
        for sample in families[name].samples:
            if sample.name.endswith("_total") and sample.labels == labels:
                return sample.value
        raise AssertionError(f"{name} {labels} not in /metrics")

    def gauge(name: str, **labels: str) -> float:
        return next(s.value for s in families[name].samples if s.labels == labels)

    q = state.scalar
    assert (
        value("scanrestore_files_done") == q("SELECT count(*) FROM runs WHERE status='done'") == 2
    )
    assert (
        value("scanrestore_files_failed")
        == q("SELECT count(*) FROM runs WHERE status='failed'")
        == 1
    )
    assert (
        value("scanrestore_files_duplicate")
        == q("SELECT count(*) FROM events WHERE kind='duplicate'")
        == 1
    )
    assert value("scanrestore_files_ingested") == q(
        "SELECT count(*) FROM source_paths WHERE source_sha256 IS NOT NULL"
    )
    assert value("scanrestore_worker_deaths") == q("SELECT count(*) FROM runs WHERE status='died'")
    assert value("scanrestore_fixity_mismatches") == q(
        "SELECT count(*) FROM events WHERE kind='fixity_mismatch'"
    )
    for decision in ("approved", "rejected"):
        assert value("scanrestore_review_decisions", decision=decision) == q(
            "SELECT count(*) FROM reviews WHERE decision = ?", decision
        )
    # broken.png was quarantined once, by the fixture's run; a retry (an earlier test) has
    # released it since, and a counter does not go down.
    assert (
        value("scanrestore_files_quarantined")
        == q("SELECT count(*) FROM events WHERE kind = 'quarantined'")
        == 1
    )
    for job_state in ("queued", "done", "failed", "quarantined"):
        assert gauge("scanrestore_queue_depth", state=job_state) == q(
            "SELECT count(*) FROM jobs WHERE state = ?", job_state
        )
    timings = families["scanrestore_stage_seconds_per_megapixel"].samples
    counts = {s.labels["stage"]: s.value for s in timings if s.name.endswith("_count")}
    assert counts["upscale"] == q(
        "SELECT count(*) FROM stage_runs s JOIN runs r ON r.id = s.run_id "
        "WHERE s.stage = 'upscale' AND r.status = 'done'"
    )
    last = q("SELECT max(finished_at) FROM runs WHERE status = 'done'")
    from datetime import datetime

    assert gauge("scanrestore_last_output_timestamp_seconds") == pytest.approx(
        datetime.fromisoformat(last).timestamp()
    )


def test_a_cli_decision_is_shown_by_history_and_carried_into_the_next_sidecar(state, capsys):
    output = state.out / "album/scratched.v1.png"
    assert (
        state.cli("review", str(output), "--reject", "--note", "face too smooth", "--by", "ann")
        == 0
    )
    capsys.readouterr()
    assert state.cli("history", "album/scratched.png", "--json") == 0
    history = json.loads(capsys.readouterr().out)
    with state.db() as db:
        recorded = db.execute(
            "SELECT v.decision, v.reviewer, v.note, o.path FROM reviews v "
            "JOIN outputs o ON o.id = v.output_id WHERE o.path = 'album/scratched.v1.png' "
            "ORDER BY v.id"
        ).fetchall()
    assert recorded[-1] == ("rejected", "ann", "face too smooth", "album/scratched.v1.png")
    shown = [(r["decision"], r["reviewer"], r["note"], r["output"]) for r in history[0]["reviews"]]
    assert shown == recorded
    assert state.cli("review", str(state.scans / "nothing.png"), "--approve") == 1
    assert state.cli("reprocess", "album/scratched.png") == 0
    state.once()  # (broken.png, retried above, fails again)
    sidecar = json.loads((state.out / "album/scratched.v2.json").read_text())
    carried = [(r["decision"], r["reviewer"], r["note"], r["output"]) for r in sidecar["reviews"]]
    assert carried == recorded


def test_watch_with_the_page_enabled_serves_it_with_progress_and_takes_it_down(tmp_path):
    from webserver import free_port

    port = free_port()
    # 640x480 in 300 tiles, through a model slow enough to be seen running however idle
    # the machine is (a tiny one finished between two polls on a quiet CI machine).
    site = State(tmp_path, tile=32, slow_model=True, enabled=True, port=port)
    site.drop("photo.jpg", "corpus/metadata_edge_cases/exifsamples_DSCN0010.jpg")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(site.config), "watch"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def status() -> dict | None:
        assert daemon.poll() is None, daemon.stderr.read()
        try:
            return httpx.get(f"{url}/api/status", timeout=5).json()
        except httpx.TransportError:
            return None

    def wait_for(predicate, what: str) -> dict:
        deadline = time.monotonic() + 180
        while True:
            now = status()
            if now is not None and predicate(now):
                return now
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {now}"
            time.sleep(0.1)

    try:
        tiled = wait_for(
            lambda s: any((j["progress"] or {}).get("total") for j in s["running"]),
            "a running job's tile progress",
        )
        progress = tiled["running"][0]["progress"]
        assert progress["stage"] == "upscale" and progress["stages"] == 2
        assert 0 <= progress["done"] <= progress["total"] == 300
        wait_for(lambda s: s["counts"]["done"] == 1 and not s["running"], "the job done")
        assert list((site.state / "progress").glob("*")) == []  # removed with the job
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
        daemon.stderr.close()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/api/status", timeout=5)


def test_face_boxes_found_before_the_upscale_are_shown_in_output_pixels():
    from daemon.web.views import _faces

    face = {"stage": "face", "skipped": None, "params": {
        "fidelity": 0.7, "faces": [{"box": [10.0, 20.5, 30.0, 60.0]}]}}  # fmt: skip
    upscale = {"stage": "upscale", "skipped": None, "params": {}}
    size = {"output": [400, 400], "source": [100, 100]}
    assert _faces({"stages": [face, upscale]}, size) == [
        {"box": [40, 82, 80, 158], "fidelity": 0.7}
    ]
    assert _faces({"stages": [upscale, face]}, size) == [{"box": [10, 20, 20, 39], "fidelity": 0.7}]
    assert _faces({"stages": [{**face, "skipped": "no faces found"}, upscale]}, size) == []
