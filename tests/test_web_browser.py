"""The review page in a real browser: Debian's headless Chromium driven by Playwright, against a
real `scanrestore serve` over a state folder a real daemon run made. The dashboard's counts,
the output page's viewer (divider, mask overlay, Lanczos view, 100 % zoom) and keyboard
decisions that land in the database. Screenshots go to bench/results/: web-*.latest.png on each
run (ignored by git, so a test run leaves the checkout clean), and with
SCANRESTORE_SCREENSHOTS=readme the committed web-dashboard.png and web-output.png the README
shows."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from webserver import REPO, State, server

CHROMIUM = Path("/usr/bin/chromium")
RESULTS = REPO / "bench" / "results"


def _wait(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: scripts/setup installs Debian's chromium when run as root"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox"] if os.geteuid() == 0 else [],
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> State:
    site = State(tmp_path_factory.mktemp("browser"))
    site.drop_scratched("album/scratched.png")
    site.drop("album/bird.png")
    (site.scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    assert site.once() == 1  # broken.png is quarantined
    return site


@pytest.fixture(scope="module")
def url(state):
    with server(state) as base:
        yield base


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 820})
    errors: list[str] = []
    opened = context.new_page()
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def _save(png: bytes, name: str) -> Path:
    """A small screenshot (quantised to 256 colours) as bench/results/NAME.latest.png, or as
    the README's bench/results/NAME.png when SCANRESTORE_SCREENSHOTS=readme."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(256, dither=Image.Dither.NONE)
    readme = os.environ.get("SCANRESTORE_SCREENSHOTS") == "readme"
    path = RESULTS / f"{name}{'' if readme else '.latest'}.png"
    image.save(path, optimize=True)
    assert Image.open(path).size == image.size
    return path


def _shot(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(int)


def test_the_dashboard_shows_the_database_counts_and_refreshes_itself(state, url, page):
    page.goto(f"{url}/")
    with state.db() as db:
        counts = dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    assert counts == {"done": 2, "quarantined": 1}
    for job_state in ("queued", "running", "done", "failed", "quarantined"):
        cell = page.locator(f'[data-count="{job_state}"]')
        assert cell.inner_text() == str(counts.get(job_state, 0)), job_state
    page.locator("#quarantined tbody tr").first.wait_for()
    assert "broken.png" in page.locator("#quarantined").inner_text()
    _save(page.screenshot(full_page=True), "web-dashboard")
    # A change made elsewhere shows up without a reload.
    page.evaluate("window.notReloaded = true")
    with httpx.Client(base_url=url) as client:
        client.get("/review")
        job = state.scalar("SELECT id FROM jobs WHERE state = 'quarantined'")
        answer = client.post(
            f"/api/jobs/{job}/retry",
            json={},
            headers={"x-csrf-token": client.cookies["scanrestore_csrf"]},
        )
        assert answer.status_code == 200
    page.wait_for_function(
        "() => document.querySelector('[data-count=\"queued\"]').textContent === '1'", timeout=30000
    )
    assert page.locator('[data-count="quarantined"]').inner_text() == "0"
    assert page.evaluate("window.notReloaded") is True


def test_the_output_page_compares_overlays_and_zooms(state, url, page):
    output_id = state.scalar(
        "SELECT id FROM outputs WHERE path = 'album/scratched.v1.png' AND kind = 'image'"
    )
    page.goto(f"{url}/outputs/{output_id}")
    for layer in ("#pane-after img.base", "#pane-before img.base"):
        page.wait_for_function(
            f"() => document.querySelector('{layer}').complete && "
            f"document.querySelector('{layer}').naturalWidth > 0"
        )
    viewer = page.locator("#viewer")
    box = viewer.bounding_box()
    before = _shot(viewer)
    clip = page.locator("#pane-before").evaluate("el => getComputedStyle(el).clipPath")
    # Drag the divider from the middle to four fifths of the width.
    divider = page.locator("#divider").bounding_box()
    page.mouse.move(divider["x"] + divider["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    dragged = _shot(viewer)
    assert page.locator("#pane-before").evaluate("el => getComputedStyle(el).clipPath") != clip
    band = slice(int(box["width"] * 0.55), int(box["width"] * 0.75))
    assert np.abs(dragged[:, band] - before[:, band]).mean() > 2  # that strip now shows before
    # The invented-pixel mask as an overlay on the output, toggled (the divider moved aside).
    divider = page.locator("#divider").bounding_box()
    page.mouse.move(divider["x"] + divider["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + 2, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    dragged = _shot(viewer)
    mask = page.locator("#mask")
    assert not mask.is_visible()
    page.locator("#mask-on").check()
    page.wait_for_function("() => document.querySelector('#mask').naturalWidth > 0")
    assert mask.is_visible()
    assert np.abs(_shot(viewer) - dragged).max() > 30
    page.locator("#mask-on").uncheck()
    assert not mask.is_visible()
    # The original enlarged by plain Lanczos.
    page.select_option("#before-layer", "lanczos")
    page.wait_for_function(
        "() => { const img = document.querySelector('#pane-before img.base');"
        " return img.src.includes('/image/lanczos') && img.complete && img.naturalWidth > 0; }"
    )
    assert page.locator("#before-tag").inner_text() == "Lanczos resize"
    # 100 %: this 1024 px output's overview is already at full resolution; beyond it (200 %),
    # native-resolution crops of the visible region are laid over the overview.
    page.locator("#zoom-100").click()
    assert page.locator("#zoom-level").inner_text() == "100 %"
    assert page.locator("#pane-after img.base").evaluate("img => img.naturalWidth") == 1024
    page.locator("#zoom-200").click()
    assert page.locator("#zoom-level").inner_text() == "200 %"
    page.wait_for_function(
        "() => { const img = document.querySelector('#pane-after img.detail');"
        " return img && img.complete && img.naturalWidth > 0; }"
    )
    detail = page.locator("#pane-after img.detail").first
    assert detail.evaluate("img => img.naturalWidth") == round(
        detail.evaluate("img => parseFloat(img.style.width)")
    )
    page.locator("#zoom-fit").click()
    page.mouse.move(box["x"] + 7, box["y"] + box["height"] / 2)  # the divider, back to the middle
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    page.locator("#mask-on").check()
    page.wait_for_function("() => document.querySelector('#mask').naturalWidth > 0")
    _save(page.screenshot(), "web-output")


def test_keyboard_decisions_are_recorded_and_shown(state, url, page):
    page.goto(f"{url}/review")
    rows = page.locator("#queue tbody tr")
    rows.first.wait_for()
    assert rows.count() == 2  # both outputs await review
    first, second = (int(rows.nth(i).get_attribute("data-id")) for i in range(2))
    page.keyboard.press("a")
    page.keyboard.press("r")

    def decisions() -> list[tuple[int, str]]:
        with state.db() as db:
            return db.execute("SELECT output_id, decision FROM reviews ORDER BY id").fetchall()

    _wait(lambda: len(decisions()) == 2, what="two review events")
    assert decisions() == [(first, "approved"), (second, "rejected")]
    # The rows follow once the page has the server's answers (the database may be first).
    page.wait_for_function(
        "() => { const rows = document.querySelectorAll('#queue tbody tr');"
        " return rows[0].dataset.state === 'approved' && rows[1].dataset.state === 'rejected'; }"
    )
    assert rows.nth(0).get_attribute("data-state") == "approved"
    assert rows.nth(1).get_attribute("data-state") == "rejected"
    # On the output page too; the label follows and the decision is listed.
    page.goto(f"{url}/outputs/{second}")
    page.locator("#note").fill("looks right after all")
    page.locator("#note").press("Tab")
    page.locator("body").press("a")
    page.wait_for_function("() => document.querySelector('#state').dataset.state === 'approved'")
    _wait(lambda: len(decisions()) == 3, what="a third review event")
    with state.db() as db:
        note = db.execute("SELECT note FROM reviews ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert note == "looks right after all"
    assert "approved by curator" in page.locator("#reviews").inner_text()
    page.reload()
    assert page.locator("#state").inner_text() == "approved"
