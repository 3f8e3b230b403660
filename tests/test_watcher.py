"""The watcher: ignore rules, stability, scanning, both observers, rescans, a vanishing share,
odd file names and --once. Timing-sensitive cases run on an injected clock and explicit steps;
tests with real observers only wait (generously) for what must eventually happen."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import unicodedata
from pathlib import Path

import pytest

from daemon.publish import TEMP_MARKER
from daemon.watcher import (
    IgnoreRules,
    ReadyFile,
    Refusal,
    StabilityTracker,
    Version,
    Watcher,
    run_once,
    safe_name,
    scan,
)

MODES = ["native", "polling"]
NEVER = 1e9  # a tick or poll interval that never comes: the test drives every step itself


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Inbox:
    """Collects what a watcher hands over, from whichever thread."""

    def __init__(self) -> None:
        self.ready: list[ReadyFile] = []
        self.refused: list[Refusal] = []
        self._lock = threading.Lock()

    def on_ready(self, entry: ReadyFile) -> None:
        with self._lock:
            self.ready.append(entry)

    def on_refused(self, refusal: Refusal) -> None:
        with self._lock:
            self.refused.append(refusal)

    def names(self) -> list[str]:
        with self._lock:
            return [entry.relative for entry in self.ready]

    def wait_for(self, count: int, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.names()) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.names()


def write(path: Path, data: bytes = b"scan") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def stepped(root: Path, inbox: Inbox, clock: FakeClock, **options) -> Watcher:
    """A watcher driven by the test: the clock is fake and only explicit steps run."""
    defaults = {
        "mode": "polling",
        "poll_seconds": NEVER,
        "tick_seconds": NEVER,
        "stable_seconds": 5.0,
        "rescan_seconds": 60.0,
        "clock": clock,
    }
    return Watcher(root, inbox.on_ready, inbox.on_refused, **(defaults | options))


def live(root: Path, inbox: Inbox, mode: str, **options) -> Watcher:
    """A watcher on the real clock with a real observer, as the daemon runs it, only faster."""
    defaults = {
        "mode": mode,
        "poll_seconds": 0.1,
        "tick_seconds": 0.05,
        "stable_seconds": 0.5,
        "rescan_seconds": None,
    }
    return Watcher(root, inbox.on_ready, inbox.on_refused, **(defaults | options))


def settled(root: Path, inbox: Inbox, timeout: float = 40.0) -> list[str]:
    """What the watcher has handed over, read once a marker file dropped now has been handed
    over too: whatever earlier events or rescans would still deliver (a duplicate) would have
    settled with or before it. The marker itself is left out."""
    marker = "zz-settled.tif"
    write(root / marker, b"marker")
    deadline = time.monotonic() + timeout
    while marker not in inbox.names() and time.monotonic() < deadline:
        time.sleep(0.02)
    names = inbox.names()
    assert names.count(marker) == 1, f"the marker was handed over {names.count(marker)} times"
    return [name for name in names if name != marker]


def started(watcher: Watcher) -> Watcher:
    """Start and finish the start-up scan, so later files can only be found by events."""
    watcher.start()
    watcher.step()
    assert watcher.active_mode is not None
    return watcher


# ---------------------------------------------------------------- names and rules


def test_safe_name_escapes_what_would_break_a_log_line():
    name = os.fsdecode(b'scan\n2 "a"\\b\x1b[31m\xff\xe2\x80\xae.tif')
    assert safe_name(name) == '"scan\\n2 \\"a\\"\\\\b\\x1b[31m\\xff\\u202e.tif"'
    assert safe_name(b"plain name.tif") == '"plain name.tif"'
    assert "\n" not in safe_name(Path("a\nb"))


@pytest.mark.parametrize(
    "relative",
    [
        ".hidden.tif",
        "._scan.tif",
        ".DS_Store",
        "album/.DS_Store",
        "Thumbs.db",
        "album/THUMBS.DB",
        "desktop.ini",
        "scan.tif.part",
        "scan.tif.PART",
        "scan.tmp",
        "scan.tif~",
        "@eaDir/scan.tif",
        "album/@eaDir/scan.tif/SYNOFILE_THUMB_M.jpg",
        "#recycle/scan.tif",
        "$RECYCLE.BIN/scan.tif",
        "album/.git/objects/ab",
        f"._scan.tif{TEMP_MARKER}0a1b2c3d",
        f"scan.tif{TEMP_MARKER}0a1b2c3d",
    ],
)
def test_default_rules_ignore_system_partial_and_our_temporary_files(relative):
    assert IgnoreRules().ignored(relative)


@pytest.mark.parametrize(
    "relative", ["scan.tif", "album/2019/scan.tif", "partial.tif", "tmp/scan.tif", "a~b.tif"]
)
def test_default_rules_keep_ordinary_files(relative):
    assert not IgnoreRules().ignored(relative)


def test_custom_patterns_match_components_or_paths_case_insensitively():
    rules = IgnoreRules(["*.xmp", "raw", "old/2019*"])
    assert rules.ignored("album/SCAN.XMP")
    assert rules.ignored("raw/scan.tif") and rules.ignored("album/raw/scan.tif")
    assert rules.ignored("old/2019-05/scan.tif") and rules.ignored("OLD/2019")
    assert not rules.ignored("new/old/2019/scan.tif")
    assert not rules.ignored("album/scan.tif") and not rules.ignored("rawhide.tif")


def test_an_empty_pattern_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        IgnoreRules(["*.xmp", "/"])


# ---------------------------------------------------------------- stability


def test_a_file_is_ready_only_after_the_delay_without_change():
    clock = FakeClock()
    tracker = StabilityTracker(5.0, clock)
    assert tracker.observe("a.tif", 10, 1)
    clock.advance(4.9)
    assert tracker.ready() == []
    clock.advance(0.1)
    assert tracker.ready() == ["a.tif"]
    assert not tracker.observe("a.tif", 10, 1)  # the same version does not restart the timer
    assert tracker.ready() == ["a.tif"]


def test_a_growing_file_is_never_ready():
    clock = FakeClock()
    tracker = StabilityTracker(5.0, clock)
    for size in range(1, 20):
        tracker.observe("growing.tif", size * 1000, size)
        clock.advance(4.0)
        assert tracker.ready() == []
    clock.advance(1.0)
    assert tracker.ready() == ["growing.tif"]


def test_an_event_restarts_the_timer():
    clock = FakeClock()
    tracker = StabilityTracker(5.0, clock)
    tracker.observe("a.tif", 10, 1)
    clock.advance(4.0)
    tracker.touch("a.tif")
    clock.advance(4.0)
    assert tracker.ready() == []
    assert tracker.next_due() == clock.now + 1.0
    clock.advance(1.0)
    assert tracker.ready() == ["a.tif"]


def test_an_empty_file_is_never_ready_but_is_offered_for_a_second_look():
    clock = FakeClock()
    tracker = StabilityTracker(5.0, clock)
    tracker.observe("placeholder.tif", 0, 1)
    clock.advance(3600.0)
    assert tracker.ready() == []
    assert tracker.waiting_empty() == ["placeholder.tif"]
    tracker.observe("placeholder.tif", 4096, 2)
    assert tracker.waiting_empty() == []
    clock.advance(5.0)
    assert tracker.ready() == ["placeholder.tif"]


def test_a_negative_delay_is_refused():
    with pytest.raises(ValueError, match="delay"):
        StabilityTracker(-1.0)


# ---------------------------------------------------------------- scanning


def test_scan_walks_nested_folders_and_refuses_what_is_not_a_regular_file(tmp_path):
    write(tmp_path / "top.tif", b"12345")
    write(tmp_path / "a" / "b" / "c" / "deep.tif")
    outside = write(tmp_path.parent / f"{tmp_path.name}-outside" / "secret.tif")
    (tmp_path / "a" / "link.tif").symlink_to(tmp_path / "top.tif")
    (tmp_path / "linked-folder").symlink_to(outside.parent, target_is_directory=True)
    os.mkfifo(tmp_path / "a" / "pipe")
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(tmp_path / "sock"))
        result = scan(tmp_path)
    finally:
        listener.close()
    info = (tmp_path / "top.tif").stat()
    assert result.files["top.tif"] == Version(5, info.st_mtime_ns, info.st_ino)
    assert sorted(result.files) == ["a/b/c/deep.tif", "top.tif"]
    assert result.refused == {
        "a/link.tif": "not a regular file: symbolic link",
        "linked-folder": "not a regular file: symbolic link",
        "a/pipe": "not a regular file: named pipe (FIFO)",
        "sock": "not a regular file: socket",
    }


def test_scan_prunes_ignored_folders_and_excluded_paths(tmp_path):
    write(tmp_path / "in" / "scan.tif")
    write(tmp_path / "@eaDir" / "scan.tif" / "thumb.jpg")
    (tmp_path / "@eaDir" / "link").symlink_to(tmp_path)
    write(tmp_path / "restored" / "scan.v1.tif")
    write(tmp_path / "restored" / f"._scan.tif{TEMP_MARKER}0a1b2c3d")
    result = scan(tmp_path, IgnoreRules(), exclude=[tmp_path / "restored"])
    assert list(result.files) == ["in/scan.tif"]
    assert result.refused == {}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_scan_records_an_unreadable_folder_and_goes_on(tmp_path):
    write(tmp_path / "ok.tif")
    locked = tmp_path / "locked"
    write(locked / "hidden.tif")
    locked.chmod(0)
    try:
        result = scan(tmp_path)
    finally:
        locked.chmod(0o755)
    assert list(result.files) == ["ok.tif"]
    assert result.unreadable == {"locked": "Permission denied"}
    assert not result.covers("locked/hidden.tif") and result.covers("ok.tif")


def test_scan_of_a_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "absent")


def odd_names(root: Path) -> dict[str, bytes]:
    """Files whose names break naive code, each holding its own name as content."""
    composed = unicodedata.normalize("NFC", "café.tif")
    names = [
        os.fsdecode(b"latin1-\xe9t\xe9.tif"),  # not UTF-8 at all
        "two\nlines.tif",
        "-rf.tif",
        "--help.tif",
        "x" * 251 + ".tif",  # 255 bytes, the longest a name can be
        composed,
        unicodedata.normalize("NFD", composed),  # looks the same, is another file
        "tab\there.tif",
    ]
    files = {}
    for name in names:
        data = os.fsencode(name)
        with open(os.path.join(os.fsencode(root), os.fsencode(name)), "wb") as handle:
            handle.write(data)
        files[name] = data
    return files


def test_scan_keeps_odd_names_exactly(tmp_path):
    files = odd_names(tmp_path)
    assert len(files) == 8  # the NFC/NFD twins are two files
    assert sorted(scan(tmp_path).files) == sorted(files)


# ---------------------------------------------------------------- the watcher, stepped


def test_files_present_at_start_are_handed_over_once_they_settle(tmp_path):
    write(tmp_path / "a.tif")
    write(tmp_path / "album" / "b.tif")
    clock, inbox = FakeClock(), Inbox()
    with started(stepped(tmp_path, inbox, clock)) as watcher:
        assert inbox.names() == []
        clock.advance(5.0)
        watcher.step()
        assert inbox.names() == ["a.tif", "album/b.tif"]
        clock.advance(300.0)  # rescans come and go
        watcher.step()
        assert inbox.names() == ["a.tif", "album/b.tif"]
    entry = inbox.ready[1]
    assert entry.path == tmp_path / "album" / "b.tif" and entry.size == 4
    assert entry.mtime_ns == (tmp_path / "album" / "b.tif").stat().st_mtime_ns


def test_a_rescan_finds_a_file_the_observer_missed(tmp_path):
    clock, inbox = FakeClock(), Inbox()
    # A polling observer that never polls: only the rescan can see the file.
    with started(stepped(tmp_path, inbox, clock, rescan_seconds=60.0)) as watcher:
        write(tmp_path / "missed.tif")
        for _ in range(10):
            clock.advance(5.0)
            watcher.step()
        assert inbox.names() == []
        clock.advance(10.0)  # 60 s since the start-up scan
        watcher.step()
        clock.advance(5.0)
        watcher.step()
        assert inbox.names() == ["missed.tif"]


def test_an_inotify_overflow_brings_the_rescan_forward(tmp_path):
    clock, inbox = FakeClock(), Inbox()
    with started(stepped(tmp_path, inbox, clock, rescan_seconds=3600.0)) as watcher:
        write(tmp_path / "lost.tif")
        # What watchdog logs when the kernel dropped events.
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        watcher.step()
        clock.advance(5.0)
        watcher.step()
        assert inbox.names() == ["lost.tif"]


def test_an_empty_placeholder_is_taken_only_once_it_is_filled(tmp_path):
    clock, inbox = FakeClock(), Inbox()
    placeholder = write(tmp_path / "scan.tif", b"")
    with started(stepped(tmp_path, inbox, clock)) as watcher:
        for _ in range(30):
            clock.advance(5.0)
            watcher.step()
        assert inbox.names() == [] and "scan.tif" in watcher.pending()
        placeholder.write_bytes(b"the whole scan")
        clock.advance(5.0)
        watcher.step()  # the second look sees it filled and restarts its timer
        assert inbox.names() == []
        clock.advance(5.0)
        watcher.step()
    assert [(e.relative, e.size) for e in inbox.ready] == [("scan.tif", 14)]


def test_a_changed_file_is_handed_over_again_as_a_new_version(tmp_path):
    clock, inbox = FakeClock(), Inbox()
    scan_file = write(tmp_path / "scan.tif", b"first")
    with started(stepped(tmp_path, inbox, clock, rescan_seconds=10.0)) as watcher:
        clock.advance(5.0)
        watcher.step()
        scan_file.write_bytes(b"second, longer")
        clock.advance(10.0)
        watcher.step()
        clock.advance(5.0)
        watcher.step()
    assert [e.size for e in inbox.ready] == [5, 14]


def test_known_versions_are_not_handed_over_again_after_a_restart(tmp_path):
    same = write(tmp_path / "same.tif")
    changed = write(tmp_path / "changed.tif")
    known = {
        "same.tif": Version.of(same.stat()),
        "changed.tif": Version.of(changed.stat())._replace(mtime_ns=changed.stat().st_mtime_ns - 1),
        "deleted.tif": Version(1, 1, 1),
    }
    clock, inbox = FakeClock(), Inbox()
    with started(stepped(tmp_path, inbox, clock, known=known)) as watcher:
        clock.advance(5.0)
        watcher.step()
    assert inbox.names() == ["changed.tif"]


def test_a_failing_callback_gets_the_file_again_later(tmp_path):
    clock, taken = FakeClock(), []

    def flaky(entry: ReadyFile) -> None:
        if not taken:
            taken.append(None)
            raise RuntimeError("queue busy")
        taken.append(entry.relative)

    write(tmp_path / "scan.tif")
    watcher = Watcher(
        tmp_path, flaky, mode="polling", poll_seconds=NEVER, tick_seconds=NEVER, clock=clock
    )
    with started(watcher):
        clock.advance(10.0)
        watcher.step()
        assert taken == [None]
        clock.advance(10.0)
        watcher.step()
        clock.advance(10.0)
        watcher.step()
    assert taken == [None, "scan.tif"]


def test_symlinks_and_fifos_are_refused_once_with_the_reason(tmp_path):
    clock, inbox = FakeClock(), Inbox()
    write(tmp_path / "real.tif")
    (tmp_path / "link.tif").symlink_to("real.tif")
    os.mkfifo(tmp_path / "pipe.tif")
    with started(stepped(tmp_path, inbox, clock, rescan_seconds=10.0)) as watcher:
        for _ in range(3):
            clock.advance(10.0)
            watcher.step()
    assert inbox.names() == ["real.tif"]
    assert sorted((r.relative, r.reason) for r in inbox.refused) == [
        ("link.tif", "not a regular file: symbolic link"),
        ("pipe.tif", "not a regular file: named pipe (FIFO)"),
    ]
    assert inbox.refused[0].path.parent == tmp_path


def test_the_output_folder_and_temporary_files_inside_the_root_are_never_taken(tmp_path):
    clock, inbox = FakeClock(), Inbox()
    out = tmp_path / "restored"
    write(tmp_path / "scan.tif")
    write(out / "scan.v1.tif")
    write(tmp_path / f"._scan.tif{TEMP_MARKER}0a1b2c3d")
    with started(stepped(tmp_path, inbox, clock, exclude=[out])) as watcher:
        clock.advance(5.0)
        watcher.step()
    assert inbox.names() == ["scan.tif"]


def test_odd_names_are_handed_over_and_read_back_exactly(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="scanrestore.watcher")
    files = odd_names(tmp_path)
    clock, inbox = FakeClock(), Inbox()
    with started(stepped(tmp_path, inbox, clock)) as watcher:
        clock.advance(5.0)
        watcher.step()
    assert sorted(inbox.names()) == sorted(files)
    for entry in inbox.ready:
        assert entry.path.read_bytes() == files[entry.relative] == entry.relative_bytes
    messages = [record.getMessage() for record in caplog.records]
    assert any('path="two\\nlines.tif"' in m for m in messages)
    assert any('path="latin1-\\xe9t\\xe9.tif"' in m for m in messages)
    assert not any("\n" in message for message in messages)


def test_odd_file_times_change_nothing_only_the_monotonic_clock_counts(tmp_path):
    clock, inbox = FakeClock(), Inbox()
    future, past = write(tmp_path / "future.tif"), write(tmp_path / "past.tif")
    os.utime(future, ns=(4_102_444_800 * 10**9,) * 2)  # 2100: a scanner with a wrong clock
    os.utime(past, ns=(0, 0))
    with started(stepped(tmp_path, inbox, clock)) as watcher:
        clock.advance(4.9)
        watcher.step()
        assert inbox.names() == []
        clock.advance(0.1)
        watcher.step()
    assert inbox.names() == ["future.tif", "past.tif"]


def test_a_callback_may_stop_the_watcher(tmp_path):
    write(tmp_path / "scan.tif")
    stopped = []

    def stop_now(entry: ReadyFile) -> None:
        watcher.stop()
        stopped.append(entry.relative)

    watcher = Watcher(tmp_path, stop_now, mode="native", stable_seconds=0.1, tick_seconds=0.02)
    watcher.start()
    deadline = time.monotonic() + 20.0
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.02)
    watcher.stop()
    assert stopped == ["scan.tif"] and watcher.active_mode is None


# ---------------------------------------------------------------- a share that goes away


def test_a_vanished_share_pauses_without_deleting_and_resumes(tmp_path, caplog):
    root, away = tmp_path / "share", tmp_path / "share-away"
    write(root / "a.tif")
    write(root / "album" / "b.tif")
    clock, inbox = FakeClock(), Inbox()
    with started(stepped(root, inbox, clock, mode="native", rescan_seconds=10.0)) as watcher:
        clock.advance(5.0)
        watcher.step()
        assert inbox.names() == ["a.tif", "album/b.tif"]

        root.rename(away)  # the share drops out ...
        watcher.step()
        assert not watcher.available and watcher.active_mode is None
        root.mkdir()  # ... leaving its empty mount point behind
        for _ in range(3):
            clock.advance(10.0)
            watcher.step()
        assert not watcher.available
        assert "watched folder unavailable" in caplog.text

        write(away / "c.tif")  # written on the server meanwhile
        root.rmdir()
        away.rename(root)  # the share is back
        watcher.step()
        assert watcher.available and watcher.active_mode == "native"
        clock.advance(5.0)
        watcher.step()
        clock.advance(10.0)
        watcher.step()
    assert inbox.names() == ["a.tif", "album/b.tif", "c.tif"]


def test_a_replaced_folder_is_watched_anew(tmp_path, caplog):
    root, old = tmp_path / "share", tmp_path / "share-old"
    write(root / "a.tif")
    clock, inbox = FakeClock(), Inbox()
    with started(stepped(root, inbox, clock, mode="native", rescan_seconds=3600.0)) as watcher:
        root.rename(old)
        write(root / "b.tif")  # another folder under the same name, between two steps
        watcher.step()
        assert "restarting the observer" in caplog.text and watcher.active_mode == "native"
        write(root / "c.tif")  # only the new observer's events can tell of this one
        deadline = time.monotonic() + 20.0
        while "c.tif" not in watcher.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
            watcher.step()
        clock.advance(5.0)
        watcher.step()
    assert inbox.names() == ["b.tif", "c.tif"]


def test_a_share_mounted_after_start_up_is_watched_once_it_appears(tmp_path):
    root = tmp_path / "share"
    clock, inbox = FakeClock(), Inbox()
    watcher = stepped(root, inbox, clock)
    with watcher:
        watcher.step()
        assert not watcher.available and watcher.active_mode is None
        write(root / "scan.tif")
        watcher.step()
        assert watcher.available and watcher.active_mode == "polling"
        clock.advance(5.0)
        watcher.step()
    assert inbox.names() == ["scan.tif"]


def test_a_folder_emptied_by_hand_resumes_with_the_next_file(tmp_path):
    clock, inbox = FakeClock(), Inbox()
    first = write(tmp_path / "first.tif")
    with started(stepped(tmp_path, inbox, clock, rescan_seconds=10.0)) as watcher:
        clock.advance(5.0)
        watcher.step()
        first.unlink()
        watcher.step()
        assert not watcher.available  # indistinguishable from an empty mount point
        write(tmp_path / "second.tif")
        watcher.step()
        clock.advance(5.0)
        watcher.step()
        assert watcher.available
    assert inbox.names() == ["first.tif", "second.tif"]


# ---------------------------------------------------------------- real observers


@pytest.mark.parametrize("mode", MODES)
def test_each_observer_delivers_a_dropped_file_exactly_once(tmp_path, mode):
    inbox = Inbox()
    with started(live(tmp_path, inbox, mode)) as watcher:
        assert watcher.active_mode == mode
        with open(tmp_path / "scan.tif", "wb") as handle:
            for _ in range(5):
                handle.write(b"x" * 1000)
                handle.flush()
        write(tmp_path / "new" / "deep" / "nested.tif")
        assert sorted(inbox.wait_for(2)) == ["new/deep/nested.tif", "scan.tif"]
        watcher.rescan()
        assert sorted(settled(tmp_path, inbox)) == ["new/deep/nested.tif", "scan.tif"]
    assert {e.relative: e.size for e in inbox.ready}["scan.tif"] == 5000


@pytest.mark.parametrize("mode", MODES)
def test_a_burst_of_small_files_is_taken_each_exactly_once(tmp_path, mode):
    inbox = Inbox()
    # Rescans racing the events must not hand anything over twice.
    with started(live(tmp_path, inbox, mode, rescan_seconds=0.2)):
        expected = set()
        for index in range(2000):
            name = f"batch{index % 10}/scan{index:04d}.tif"
            write(tmp_path / name, index.to_bytes(2, "big"))
            expected.add(name)
        inbox.wait_for(2000, timeout=40.0)
        names = settled(tmp_path, inbox)
    assert len(names) == len(set(names)) == 2000
    assert set(names) == expected


@pytest.mark.parametrize("mode", MODES)
def test_stop_joins_every_thread_it_started(tmp_path, mode):
    before = set(threading.enumerate())
    watcher = started(live(tmp_path, Inbox(), mode))
    assert set(threading.enumerate()) - before
    watcher.stop()
    watcher.stop()  # idempotent
    assert set(threading.enumerate()) - before == set()
    assert watcher.active_mode is None


def test_auto_mode_watches_a_local_disk_natively(tmp_path):
    with started(live(tmp_path, Inbox(), "auto")) as watcher:
        assert watcher.active_mode == "native"


def test_auto_mode_polls_a_network_share_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("daemon.watcher.watching.is_network_filesystem", lambda path: True)
    monkeypatch.setattr("daemon.watcher.watching.filesystem_type", lambda path: "nfs4")
    with started(live(tmp_path, Inbox(), "auto")) as watcher:
        assert watcher.active_mode == "polling"
    assert "network filesystem" in caplog.text and "nfs4" in caplog.text


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        Watcher(tmp_path, print, mode="inotify")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rescan_seconds"):
        Watcher(tmp_path, print, rescan_seconds=0)


def test_reading_a_file_does_not_keep_it_from_settling(tmp_path):
    target = write(tmp_path / "scan.tif")
    inbox, done = Inbox(), threading.Event()

    def reader() -> None:  # an indexer or virus scanner reading the file over and over
        while not done.is_set():
            target.read_bytes()
            time.sleep(0.01)

    with started(live(tmp_path, inbox, "native")):
        thread = threading.Thread(target=reader)
        thread.start()
        try:
            names = inbox.wait_for(1, timeout=10.0)
        finally:
            done.set()
            thread.join()
    assert names == ["scan.tif"]


# ---------------------------------------------------------------- --once


class SleepingClock(FakeClock):
    """Sleeping advances the fake clock; `on_sleep` lets a test act while --once waits."""

    def __init__(self, on_sleep=None) -> None:
        super().__init__()
        self.on_sleep = on_sleep
        self.slept = 0

    def sleep(self, seconds: float) -> None:
        self.slept += 1
        if self.on_sleep:
            self.on_sleep(self.slept)
        self.advance(seconds)


def test_once_takes_what_has_settled_and_leaves_placeholders(tmp_path):
    write(tmp_path / "a.tif")
    write(tmp_path / "album" / "b.tif")
    write(tmp_path / "empty.tif", b"")
    (tmp_path / "link.tif").symlink_to("a.tif")
    clock = SleepingClock()
    result = run_once(tmp_path, stable_seconds=5.0, clock=clock, sleep=clock.sleep)
    assert [e.relative for e in result.ready] == ["a.tif", "album/b.tif"]
    assert [r.relative for r in result.refused] == ["link.tif"]
    assert result.pending == ["empty.tif"] and result.available
    assert clock.now - 1000.0 < 10.0


def test_once_takes_files_quiet_since_before_the_scan_without_waiting_again(tmp_path):
    """Scans copied in a minute before the run (by the kernel's change time) are settled
    already on a local disk: nothing is slept. A file written during the wait is left alone."""
    write(tmp_path / "a.tif")
    write(tmp_path / "album" / "b.tif")
    clock = SleepingClock()
    later = time.time() + 60.0  # the run starts a minute after the copies
    result = run_once(
        tmp_path, stable_seconds=5.0, clock=clock, sleep=pytest.fail, wall_clock=lambda: later
    )
    assert [e.relative for e in result.ready] == ["a.tif", "album/b.tif"]
    assert result.pending == [] and clock.now == 1000.0


def test_once_still_waits_for_files_quiet_for_less_than_the_delay(tmp_path):
    written = write(tmp_path / "a.tif")
    clock = SleepingClock()
    soon = os.lstat(written).st_ctime + 2.0  # quiet for 2 of the 5 s: 3 s left to wait
    result = run_once(
        tmp_path, stable_seconds=5.0, clock=clock, sleep=clock.sleep, wall_clock=lambda: soon
    )
    assert [e.relative for e in result.ready] == ["a.tif"]
    assert clock.slept >= 1 and 2.5 <= clock.now - 1000.0 < 5.0


def test_once_on_a_network_filesystem_waits_the_whole_delay(tmp_path, monkeypatch):
    """There the server's clock sets the change time: it proves nothing about this one."""
    import daemon.watcher.once as once

    monkeypatch.setattr(once, "is_network_filesystem", lambda path: True)
    write(tmp_path / "a.tif")
    clock = SleepingClock()
    later = time.time() + 60.0
    result = run_once(
        tmp_path, stable_seconds=5.0, clock=clock, sleep=clock.sleep, wall_clock=lambda: later
    )
    assert [e.relative for e in result.ready] == ["a.tif"]
    assert clock.now - 1000.0 >= 5.0


def test_once_waits_for_a_file_still_growing(tmp_path):
    growing = write(tmp_path / "growing.tif", b"x")

    def grow(slept: int) -> None:
        if slept <= 3:
            with open(growing, "ab") as handle:
                handle.write(b"x" * 100)

    clock = SleepingClock(grow)
    result = run_once(tmp_path, stable_seconds=5.0, clock=clock, sleep=clock.sleep)
    assert [(e.relative, e.size) for e in result.ready] == [("growing.tif", 301)]
    assert clock.slept >= 4


def test_once_gives_up_at_the_timeout_and_reports_what_is_pending(tmp_path):
    growing = write(tmp_path / "endless.tif", b"x")

    def grow(slept: int) -> None:
        with open(growing, "ab") as handle:
            handle.write(b"x")

    clock = SleepingClock(grow)
    result = run_once(
        tmp_path, stable_seconds=5.0, timeout_seconds=60.0, clock=clock, sleep=clock.sleep
    )
    assert result.ready == [] and result.pending == ["endless.tif"]
    assert 60.0 <= clock.now - 1000.0 <= 66.0


def test_once_on_a_missing_folder_reports_it_unavailable(tmp_path):
    result = run_once(tmp_path / "absent", clock=FakeClock(), sleep=pytest.fail)
    assert not result.available and result.ready == [] and result.pending == []
