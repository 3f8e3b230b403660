"""The Watcher: events from watchdog's inotify or polling observer only say where to look; a scan
at start-up and periodic rescans reconcile what they missed; settled versions are handed over
once each. A share that vanishes pauses it: nothing is ever reported deleted."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from daemon.fsinfo import filesystem_type, is_network_filesystem
from daemon.seen import Version, already_seen
from daemon.watcher.names import IgnoreRules, safe_name
from daemon.watcher.scan import (
    ScanResult,
    error_reason,
    excluded_prefixes,
    file_kind,
    relative_to,
    skipped,
    walk,
)
from daemon.watcher.stability import Clock, StabilityTracker

__all__ = ["Mode", "ReadyFile", "Refusal", "Watcher"]

Mode = Literal["auto", "native", "polling"]

# Reading a file (ours included) is no sign that it is still being written.
_QUIET_EVENTS = frozenset({"opened", "closed_no_write"})
# watchdog reports a lost inotify queue only in its log; we listen there to rescan at once.
_WATCHDOG_INOTIFY_LOGGER = "watchdog.observers"

log = logging.getLogger("scanrestore.watcher")


@dataclass(frozen=True)
class ReadyFile:
    """A settled version of a regular file below the watched root.

    `relative` is "/"-separated; bytes that are not UTF-8 are surrogate escapes (os.fsdecode),
    so store `relative_bytes` where a database or JSON needs real text."""

    relative: str
    path: Path
    size: int
    mtime_ns: int
    inode: int

    @property
    def version(self) -> Version:
        return Version(self.size, self.mtime_ns, self.inode)

    @property
    def relative_bytes(self) -> bytes:
        return os.fsencode(self.relative)


@dataclass(frozen=True)
class Refusal:
    """An entry the watcher will not take (symlink, FIFO, device, unreadable folder) and why."""

    relative: str
    path: Path
    reason: str


class _EventSink(FileSystemEventHandler):
    """Runs on watchdog's thread: only notes where to look, so an event storm stays cheap."""

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        self._watcher._note_event(event)


class _OverflowHook(logging.Handler):
    """Hears watchdog's "Inotify queue overflowed" warning and asks for a rescan."""

    def __init__(self, watcher: Watcher) -> None:
        super().__init__()
        self._watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._watcher.rescan()


class Watcher:
    """Watches `root` recursively and calls `on_ready(ReadyFile)` once per settled file version
    and `on_refused(Refusal)` once per refused entry.

    `mode`: "native" (inotify), "polling" (stat every `poll_seconds`, for shares), or "auto":
    polling when the root is on a network filesystem, warned about at start-up. `start()` runs
    a loop thread that calls `step()` every `tick_seconds`; `step()` may also be called
    directly (tests, `run_once`). Stability and the rescan schedule use `clock`.

    `known` maps relative paths to the versions (size, mtime_ns, inode) already taken earlier
    (daemon.seen.seen_versions), so a restart does not hand over the whole archive again.
    Callbacks run on the loop thread; one that raises is logged and the file is offered again
    after another quiet period.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        on_ready: Callable[[ReadyFile], object],
        on_refused: Callable[[Refusal], object] | None = None,
        *,
        mode: Mode = "auto",
        stable_seconds: float = 10.0,
        rescan_seconds: float | None = 900.0,
        poll_seconds: float = 10.0,
        tick_seconds: float = 0.5,
        patterns: Iterable[str] = (),
        exclude: Iterable[str | os.PathLike[str]] = (),
        known: Mapping[str, tuple[int, int, int]] | None = None,
        clock: Clock = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        if mode not in ("auto", "native", "polling"):
            raise ValueError(f"mode must be auto, native or polling, not {mode!r}")
        for name, value in (("poll_seconds", poll_seconds), ("tick_seconds", tick_seconds)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, not {value}")
        if rescan_seconds is not None and rescan_seconds <= 0:
            raise ValueError(f"rescan_seconds must be > 0 or None, not {rescan_seconds}")
        self.root = os.path.realpath(os.fspath(root))
        self.requested_mode: Mode = mode
        self._on_ready = on_ready
        self._on_refused = on_refused
        self._rescan_seconds = rescan_seconds
        self._poll_seconds = poll_seconds
        self._tick_seconds = tick_seconds
        self._rules = IgnoreRules(patterns)
        self._excluded = excluded_prefixes(self.root, exclude)
        self._clock = clock
        self._log = logger or log
        self._tracker = StabilityTracker(stable_seconds, clock)
        self._reported: dict[str, Version] = {
            path: Version(*version) for path, version in (known or {}).items()
        }
        self._refused: dict[str, str] = {}

        self._events_lock = threading.Lock()
        self._pending_files: set[str] = set()
        self._pending_dirs: set[str] = set()
        self._offer_again: set[str] = set()
        self._rescan_requested = True  # the start-up scan
        self._next_rescan = float("-inf")

        self._step_lock = threading.RLock()
        self._available: bool | None = None
        self._observer: BaseObserver | None = None
        self._observer_mode: str | None = None
        self._observer_identity: tuple[int, int] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._overflow_hook: _OverflowHook | None = None
        self._last_problem = ""

    # ------------------------------------------------------------ public

    @property
    def available(self) -> bool:
        """False while the watched folder is missing, unreadable or emptied under us."""
        return bool(self._available)

    @property
    def active_mode(self) -> str | None:
        """The kind of observer running ("native" or "polling"), or None."""
        return self._observer_mode

    def pending(self) -> dict[str, Version]:
        """Files seen but not yet settled (empty placeholders included)."""
        with self._step_lock:
            return self._tracker.tracked()

    def quiet_before(self, relative: str, version: Version, seconds: float) -> None:
        """`relative`, still at `version`, had been quiet for `seconds` before this watcher
        first saw it: that time counts toward its settling (see run_once)."""
        with self._step_lock:
            if self._tracker.version(relative) == version:
                self._tracker.quiet_before(relative, seconds)

    def next_settle_at(self) -> float | None:
        """The clock time at which the next file seen will have been quiet for the delay."""
        with self._step_lock:
            return self._tracker.next_due()

    def rescan(self) -> None:
        """Ask for a full rescan at the next step (thread-safe)."""
        with self._events_lock:
            self._rescan_requested = True

    def offer_again(self, relative: str) -> None:
        """Forget that `relative` was handed over, because its consumer could not take it (it
        was unreadable, say): an event on it or the next rescan offers it again (thread-safe)."""
        with self._events_lock:
            self._offer_again.add(relative)

    def start(self) -> None:
        """Start watching: the loop thread runs the start-up scan, starts the observer (once the
        folder is there) and keeps both going until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("watcher already started")
        self._overflow_hook = _OverflowHook(self)
        logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).addHandler(self._overflow_hook)
        self._thread = threading.Thread(
            target=self._run, name=f"watcher {safe_name(self.root)}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop and join every thread this watcher started (idempotent)."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join()  # (a callback may call stop() from the loop thread itself)
        with self._step_lock:
            self._stop_observer()
        if self._overflow_hook is not None:
            logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).removeHandler(self._overflow_hook)
            self._overflow_hook = None

    def __enter__(self) -> Watcher:
        """Start unless already started (as watchdog's observers do); stop on exit."""
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def step(self) -> None:
        """One pass: check the folder is there, (re)start the observer if it should run, rescan
        when due, look where events pointed, and hand over what has settled."""
        with self._step_lock:
            if not self._check_available():
                self._stop_observer()
                with self._events_lock:
                    self._pending_files.clear()
                    self._pending_dirs.clear()
                return
            if self._thread is not None and not self._stopping.is_set():
                try:
                    self._ensure_observer()
                except OSError as exc:  # both kinds failed: the rescans still find files
                    self._log_once("observer could not start", exc)
            with self._events_lock:
                due = self._rescan_requested or self._clock() >= self._next_rescan
                self._rescan_requested = False
                again, self._offer_again = self._offer_again, set()
            for path in again:
                self._reported.pop(path, None)
            if due and not self._full_rescan():
                return
            self._drain_events()
            self._settle()

    # ------------------------------------------------------------ availability

    def _check_available(self) -> bool:
        reason = self._unavailable_reason()
        if reason is None:
            if self._available is False:
                self._log.info("watched folder available again: path=%s", safe_name(self.root))
                self.rescan()
            self._available = True
            return True
        if self._available is not False:
            self._log.warning(
                "watched folder unavailable: path=%s reason=%s; pausing, nothing is taken as "
                "deleted",
                safe_name(self.root),
                reason,
            )
        self._available = False
        return False

    def _unavailable_reason(self) -> str | None:
        try:
            info = os.stat(self.root)
        except OSError as exc:
            return error_reason(exc)
        if not stat.S_ISDIR(info.st_mode):
            return "not a folder"
        try:
            with os.scandir(self.root) as listing:
                empty = next(listing, None) is None
        except OSError as exc:
            return error_reason(exc)
        # A share that drops out often leaves its empty mount point behind: a folder that held
        # files we took and now holds nothing at all is taken to be away, not emptied.
        if empty and self._reported:
            return f"empty, though it held {len(self._reported)} files (share unmounted?)"
        return None

    def _log_once(self, what: str, exc: OSError) -> None:
        message = f"{what}: path={safe_name(self.root)} error={exc}"
        if message != self._last_problem:
            self._log.warning("%s", message)
            self._last_problem = message

    def _full_rescan(self) -> bool:
        """Reconcile with a walk of the whole tree; False when the root failed meanwhile."""
        started = time.monotonic()
        try:
            result = walk(self.root, self._rules, self._excluded, "")
        except OSError as exc:
            self._log.warning("rescan failed: path=%s reason=%s", safe_name(self.root), exc)
            self._available = None  # the next check logs what is wrong
            return False
        self._take(result)
        for gone in [p for p in self._tracker.tracked() if self._vanished(p, result)]:
            self._tracker.forget(gone)
        for gone in [p for p in self._reported if self._vanished(p, result)]:
            del self._reported[gone]
        for gone in [p for p in self._refused if p not in result.refused and result.covers(p)]:
            del self._refused[gone]
        if self._rescan_seconds is not None:
            self._next_rescan = self._clock() + self._rescan_seconds
        else:
            self._next_rescan = float("inf")
        self._log.info(
            "rescan: path=%s files=%d settling=%d refused=%d seconds=%.2f",
            safe_name(self.root),
            len(result.files),
            len(self._tracker),
            len(self._refused),
            time.monotonic() - started,
        )
        return True

    @staticmethod
    def _vanished(path: str, result: ScanResult) -> bool:
        return path not in result.files and result.covers(path)

    # ------------------------------------------------------------ taking files

    def _take(self, result: ScanResult) -> None:
        """Track every file of a scan that is new or changed since it was handed over."""
        for path, version in result.files.items():
            if path in self._tracker or not already_seen(self._reported.get(path), version):
                self._tracker.observe(path, *version)
            self._refused.pop(path, None)
        for path, reason in result.refused.items():
            self._refuse(path, reason)
        for path, reason in result.unreadable.items():
            self._refuse(path, f"unreadable: {reason}")

    def _drain_events(self) -> None:
        with self._events_lock:
            files, self._pending_files = self._pending_files, set()
            folders, self._pending_dirs = self._pending_dirs, set()
        for folder in sorted(folders):
            self._take(walk(self.root, self._rules, self._excluded, folder))
        for path in sorted(files):
            self._refresh(path)

    def _refresh(self, path: str) -> None:
        """An event pointed at `path`: look at it now and restart its timer."""
        info = self._lstat(path)
        if info is None:
            self._tracker.forget(path)
        elif stat.S_ISDIR(info.st_mode):
            self._tracker.forget(path)
            self._take(walk(self.root, self._rules, self._excluded, path))
        elif not stat.S_ISREG(info.st_mode):
            self._tracker.forget(path)
            self._refuse(path, file_kind(info.st_mode))
        else:
            version = Version.of(info)
            self._refused.pop(path, None)
            if path in self._tracker or not already_seen(self._reported.get(path), version):
                self._tracker.observe(path, *version)
                self._tracker.touch(path)

    def _settle(self) -> None:
        """Hand over every file that has stayed the same for the delay, after one last look."""
        for path in self._tracker.waiting_empty():
            seen = self._tracker.version(path)
            if self._recheck(path) == seen:
                self._tracker.touch(path)  # still a placeholder: look again after another delay
        for path in self._tracker.ready():
            if self._stopping.is_set() and self._thread is not None:
                return
            seen = self._tracker.version(path)
            version = self._recheck(path)
            if version is None or version != seen:
                continue  # changed since last seen: the timer restarted
            entry = ReadyFile(path, Path(self.root, path), *version)
            if self._deliver(entry):
                self._reported[path] = version
                self._tracker.forget(path)
            else:
                self._tracker.touch(path)

    def _recheck(self, path: str) -> Version | None:
        """Stat a tracked path again; the tracker follows what it finds. None when it is no
        longer a regular file."""
        info = self._lstat(path)
        if info is None or not stat.S_ISREG(info.st_mode):
            self._tracker.forget(path)
            if info is not None and not stat.S_ISDIR(info.st_mode):
                self._refuse(path, file_kind(info.st_mode))
            return None
        version = Version.of(info)
        self._tracker.observe(path, *version)
        return version

    def _lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(os.path.join(self.root, path))
        except OSError:
            return None  # gone, or the share hiccuped: the next rescan settles it

    def _deliver(self, entry: ReadyFile) -> bool:
        self._log.info("file ready: path=%s size=%d", safe_name(entry.relative), entry.size)
        try:
            self._on_ready(entry)
        except Exception:
            self._log.exception(
                "on_ready failed, will offer again: path=%s", safe_name(entry.relative)
            )
            return False
        return True

    def _refuse(self, path: str, reason: str) -> None:
        if self._refused.get(path) == reason:
            return
        self._refused[path] = reason
        self._log.warning("file refused: path=%s reason=%s", safe_name(path), reason)
        if self._on_refused is None:
            return
        try:
            self._on_refused(Refusal(path, Path(self.root, path), reason))
        except Exception:
            self._log.exception("on_refused failed: path=%s", safe_name(path))

    # ------------------------------------------------------------ events and observers

    def _note_event(self, event: FileSystemEvent) -> None:
        """Called on watchdog's thread for every event."""
        if event.event_type in _QUIET_EVENTS or self._stopping.is_set():
            return
        targets = [event.src_path]
        if event.event_type == "moved":
            targets = [event.dest_path] if event.is_directory else [event.src_path, event.dest_path]
        elif event.is_directory and event.event_type != "created":
            return  # a folder's own changes and deletions tell nothing new about its files
        for target in targets:
            path = relative_to(self.root, os.fsdecode(target)) if target else None
            if not path or skipped(path, self._rules, self._excluded):
                continue
            with self._events_lock:
                (self._pending_dirs if event.is_directory else self._pending_files).add(path)

    def _listdir(self, folder: str | None) -> Iterator[os.DirEntry[str]]:
        """os.scandir for the polling observer, minus what we ignore (so it does not stat the
        thumbnails of a whole NAS every poll)."""
        folder = os.fspath(folder) if folder else self.root
        base = relative_to(self.root, folder)
        with os.scandir(folder) as listing:
            for entry in listing:
                path = f"{base}/{entry.name}" if base else entry.name
                if base is None or not skipped(path, self._rules, self._excluded):
                    yield entry

    def _ensure_observer(self) -> None:
        identity = _identity(self.root)
        if identity is None:
            return  # gone since the check: the next step pauses
        if self._observer is not None:
            emitters_alive = all(e.is_alive() for e in self._observer.emitters)
            if (
                self._observer.is_alive()
                and emitters_alive
                and self._observer.emitters
                and identity == self._observer_identity
            ):
                return
            self._log.warning(
                "restarting the observer: path=%s reason=%s",
                safe_name(self.root),
                "folder replaced" if identity != self._observer_identity else "observer ended",
            )
            self._stop_observer()
        self._start_observer(identity)

    def _start_observer(self, identity: tuple[int, int] | None) -> None:
        mode = self._choose_mode()
        observer = None
        if mode == "native":
            try:
                observer = self._launch(Observer())
            except OSError as exc:  # e.g. the inotify watch limit on a huge tree
                self._log.warning(
                    "native watching failed, polling instead: path=%s error=%s",
                    safe_name(self.root),
                    exc,
                )
                mode = "polling"
        if observer is None:
            observer = self._launch(
                PollingObserverVFS(os.lstat, self._listdir, polling_interval=self._poll_seconds)
            )
        self._observer, self._observer_mode, self._observer_identity = observer, mode, identity
        self.rescan()  # whatever happened before the observer ran is found by a rescan
        self._log.info("watching: path=%s mode=%s", safe_name(self.root), mode)

    def _launch(self, observer: BaseObserver) -> BaseObserver:
        try:
            observer.schedule(_EventSink(self), self.root, recursive=True)
            observer.start()
        except BaseException:
            _dispose(observer)
            raise
        return observer

    def _choose_mode(self) -> str:
        fstype = filesystem_type(self.root)
        network = is_network_filesystem(self.root)
        if network:
            self._log.warning(
                "watched folder is on a network filesystem: path=%s filesystem=%s mode=%s%s",
                safe_name(self.root),
                fstype,
                self.requested_mode,
                "; changes made by other machines show only at rescans"
                if self.requested_mode == "native"
                else f"; polling every {self._poll_seconds:g} s",
            )
        if self.requested_mode == "auto":
            return "polling" if network else "native"
        return self.requested_mode

    def _stop_observer(self) -> None:
        if self._observer is not None:
            _dispose(self._observer)
            self._observer = self._observer_mode = self._observer_identity = None

    def _run(self) -> None:
        while not self._stopping.wait(self._tick_seconds):
            try:
                self.step()
            except Exception:  # the watcher must outlive one bad pass; the next one retries
                self._log.exception("watcher step failed: path=%s", safe_name(self.root))


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _dispose(observer: BaseObserver) -> None:
    """Stop an observer and join its threads, started or not (the inotify one starts a reader
    thread in its constructor)."""
    observer.stop()
    if observer.ident is not None:
        observer.join()
