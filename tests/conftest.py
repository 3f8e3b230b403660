"""Shared fixtures: the ../shared folder, and a guard that fails any test leaking threads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights"
CORPUS = SHARED / "corpus"
NO_SHARED = "../shared (real weights and corpus) is not present beside the repository"


def shared_file(relative: str) -> Path:
    """A file under ../shared, or skip the test saying why it cannot run here."""
    path = SHARED / relative
    if not SHARED.is_dir():
        pytest.skip(NO_SHARED)
    if not path.exists():
        pytest.fail(f"{path} is missing from ../shared")
    return path


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves a thread running (watchdog's rule: threads are joined)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"
