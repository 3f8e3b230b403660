"""The watcher: finds files in the watched tree and hands each settled version over exactly once.

Events (watchdog's inotify or polling observer) only say where to look; a scan at start-up and
a periodic full rescan reconcile whatever the events missed. A share that vanishes pauses the
watcher: nothing is ever reported deleted.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from daemon.fsinfo import filesystem_type, is_network_filesystem
from daemon.publish import TEMP_MARKER
from daemon.seen import Version, already_seen

__all__ = [
    "DEFAULT_IGNORED_NAMES",
    "DEFAULT_IGNORED_SUFFIXES",
    "IgnoreRules",
    "OnceResult",
    "ReadyFile",
    "Refusal",
    "ScanResult",
    "StabilityTracker",
    "Version",
    "Watcher",
    "run_once",
    "safe_name",
    "scan",
]

Mode = Literal["auto", "native", "polling"]
Clock = Callable[[], float]

# Compared case-insensitively: Windows and macOS clients write these names in any case.
DEFAULT_IGNORED_NAMES = frozenset(
    {
        "@eadir",  # Synology thumbnails
        "#recycle",  # Synology recycle bin: deleted files must not come back as new ones
        "#snapshot",
        "$recycle.bin",
        "system volume information",
        "lost+found",
        "thumbs.db",
        "desktop.ini",
    }
)
DEFAULT_IGNORED_SUFFIXES = (".part", ".tmp", "~")  # files still being written by their tools

# Reading a file (ours included) is no sign that it is still being written.
_QUIET_EVENTS = frozenset({"opened", "closed_no_write"})
# watchdog reports a lost inotify queue only in its log; we listen there to rescan at once.
_WATCHDOG_INOTIFY_LOGGER = "watchdog.observers"

log = logging.getLogger("scanrestore.watcher")


def safe_name(path: str | bytes | os.PathLike[str]) -> str:
    """A file name fit for one log line: quoted, with control characters, quotes, backslashes
    and undecodable bytes escaped (a name may hold a newline or terminal escape codes)."""
    text = os.fsdecode(path)
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char in '\\"':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        elif code < 0x100:
            out.append(repr(char)[1:-1] if char in "\n\r\t" else f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


# ---------------------------------------------------------------- what to ignore


class IgnoreRules:
    """Names the watcher never takes: dot files (so macOS "._*", ".DS_Store" and our own
    temporary files), names ending in .part/.tmp/~, NAS system folders (@eaDir, #recycle ...),
    Thumbs.db, plus `patterns`.

    A pattern without "/" is a shell glob matched against every component of the relative path
    (so "raw" or "*.xmp" also ignore everything below a folder of that name); one with "/" is
    matched against the relative path and each of its parent folders ("old/2019*"). Matching is
    case-insensitive, as on the SMB shares scans arrive on.
    """

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        for pattern in self.patterns:
            if not isinstance(pattern, str) or not pattern.strip("/"):
                raise ValueError(f"ignore pattern {pattern!r}: must be a non-empty glob")
        self._name_patterns = tuple(p.casefold() for p in self.patterns if "/" not in p)
        self._path_patterns = tuple(p.strip("/").casefold() for p in self.patterns if "/" in p)

    def ignored(self, relative: str) -> bool:
        """True when `relative` (a "/"-separated path below the watched root) or any folder it
        lies in is ignored."""
        parts = relative.split("/")
        if any(self.ignored_name(part) for part in parts):
            return True
        if self._path_patterns:
            folded = [part.casefold() for part in parts]
            for end in range(1, len(folded) + 1):
                prefix = "/".join(folded[:end])
                if any(fnmatchcase(prefix, pattern) for pattern in self._path_patterns):
                    return True
        return False

    def ignored_name(self, name: str) -> bool:
        """True when a file or folder of this name is ignored wherever it is."""
        if name.startswith(".") or TEMP_MARKER in name:
            return True
        folded = name.casefold()
        if folded in DEFAULT_IGNORED_NAMES or folded.endswith(DEFAULT_IGNORED_SUFFIXES):
            return True
        return any(fnmatchcase(folded, pattern) for pattern in self._name_patterns)


# ---------------------------------------------------------------- stability


class _Entry:
    __slots__ = ("since", "version")

    def __init__(self, version: Version, since: float) -> None:
        self.version = version
        self.since = since


class StabilityTracker:
    """A file is ready once its size and mtime have stayed the same, with no event, for `delay`
    seconds of `clock` (monotonic, so a wall-clock jump neither rushes nor stalls it). An empty
    file is never ready: scanners create a 0-byte placeholder and fill it later."""

    def __init__(self, delay: float, clock: Clock = time.monotonic) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        self.delay = delay
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def observe(self, path: str, size: int, mtime_ns: int, inode: int = 0) -> bool:
        """Record the size, mtime and inode just seen; True (and the timer restarts) when they
        are new."""
        version = Version(size, mtime_ns, inode)
        entry = self._entries.get(path)
        if entry is not None and entry.version == version:
            return False
        self._entries[path] = _Entry(version, self._clock())
        return True

    def touch(self, path: str) -> None:
        """An event for `path`: restart its timer (no-op for a path not tracked)."""
        entry = self._entries.get(path)
        if entry is not None:
            entry.since = self._clock()

    def forget(self, path: str) -> None:
        self._entries.pop(path, None)

    def version(self, path: str) -> Version | None:
        entry = self._entries.get(path)
        return entry.version if entry else None

    def ready(self) -> list[str]:
        """Non-empty paths quiet for at least the delay, sorted; they stay tracked until
        forgotten."""
        return self._quiet(empty=False)

    def waiting_empty(self) -> list[str]:
        """Empty paths quiet for the delay: placeholders worth checking again."""
        return self._quiet(empty=True)

    def next_due(self) -> float | None:
        """The clock time at which the next tracked path will have been quiet for the delay."""
        if not self._entries:
            return None
        return min(entry.since for entry in self._entries.values()) + self.delay

    def tracked(self) -> dict[str, Version]:
        """Every path being watched for stability, with the version last seen."""
        return {path: entry.version for path, entry in self._entries.items()}

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _quiet(self, *, empty: bool) -> list[str]:
        now = self._clock()
        return sorted(
            path
            for path, entry in self._entries.items()
            if (entry.version.size == 0) == empty and now - entry.since >= self.delay
        )


# ---------------------------------------------------------------- scanning


@dataclass
class ScanResult:
    """One walk of the tree: regular files, refused entries and folders that could not be read,
    all keyed by "/"-separated paths relative to the root."""

    files: dict[str, Version] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)

    def covers(self, relative: str) -> bool:
        """False when `relative` lies in a folder this scan could not read (so its absence from
        `files` proves nothing)."""
        parent = relative
        while parent:
            if parent in self.unreadable:
                return False
            parent = parent.rpartition("/")[0]
        return True


def scan(
    root: str | os.PathLike[str],
    rules: IgnoreRules | None = None,
    *,
    exclude: Iterable[str | os.PathLike[str]] = (),
    under: str = "",
) -> ScanResult:
    """Walk `root` (or its subfolder `under`) without following symlinks.

    Regular files come back with their size and mtime; symlinks, FIFOs, sockets and devices are
    refused with the reason; ignored names and the `exclude` paths (absolute, e.g. an output
    folder inside the watched one) are skipped with everything below them. An unreadable root
    raises OSError; an unreadable subfolder is recorded and the walk goes on.
    """
    root = os.fspath(root)
    return _walk(root, rules or IgnoreRules(), _excluded_prefixes(root, exclude), under)


def _walk(root: str, rules: IgnoreRules, excluded: tuple[str, ...], under: str) -> ScanResult:
    result = ScanResult()
    if under and (_skipped(under, rules, excluded) or not _is_real_dir(os.path.join(root, under))):
        return result
    stack = [under]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(os.path.join(root, folder) if folder else root) as listing:
                entries = list(listing)
        except (FileNotFoundError, NotADirectoryError):
            if not folder:
                raise
            continue  # removed while we walked
        except OSError as exc:
            if not folder:
                raise
            result.unreadable[folder] = _reason(exc)
            continue
        for entry in entries:
            relative = f"{folder}/{entry.name}" if folder else entry.name
            if _skipped(relative, rules, excluded):
                continue
            _classify(entry, relative, stack, result)
    return result


def _classify(entry: os.DirEntry[str], relative: str, stack: list[str], result: ScanResult) -> None:
    try:
        if entry.is_dir(follow_symlinks=False):
            stack.append(relative)
            return
        info = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        result.unreadable[relative] = _reason(exc)
        return
    if stat.S_ISREG(info.st_mode):
        result.files[relative] = Version.of(info)
    else:
        result.refused[relative] = _file_kind(info.st_mode)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "named pipe (FIFO)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISDIR, "folder"),
    ):
        if test(mode):
            return f"not a regular file: {name}"
    return "not a regular file"


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _excluded_prefixes(root: str, exclude: Iterable[str | os.PathLike[str]]) -> tuple[str, ...]:
    """The `exclude` paths that lie inside `root`, as relative paths."""
    prefixes = []
    for path in exclude:
        for candidate in {os.path.abspath(os.fspath(path)), os.path.realpath(os.fspath(path))}:
            relative = _relative_to(root, candidate)
            if relative:
                prefixes.append(relative)
    return tuple(prefixes)


def _relative_to(root: str, path: str) -> str | None:
    """`path` relative to `root` ("" for the root itself), or None when outside it."""
    if path == root:
        return ""
    prefix = root if root.endswith("/") else root + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


def _skipped(relative: str, rules: IgnoreRules, excluded: tuple[str, ...]) -> bool:
    if any(relative == prefix or relative.startswith(prefix + "/") for prefix in excluded):
        return True
    return rules.ignored(relative)


# ---------------------------------------------------------------- what the watcher reports


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


# ---------------------------------------------------------------- the watcher


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
        self._excluded = _excluded_prefixes(self.root, exclude)
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
            return _reason(exc)
        if not stat.S_ISDIR(info.st_mode):
            return "not a folder"
        try:
            with os.scandir(self.root) as listing:
                empty = next(listing, None) is None
        except OSError as exc:
            return _reason(exc)
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
            result = _walk(self.root, self._rules, self._excluded, "")
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
            self._take(_walk(self.root, self._rules, self._excluded, folder))
        for path in sorted(files):
            self._refresh(path)

    def _refresh(self, path: str) -> None:
        """An event pointed at `path`: look at it now and restart its timer."""
        info = self._lstat(path)
        if info is None:
            self._tracker.forget(path)
        elif stat.S_ISDIR(info.st_mode):
            self._tracker.forget(path)
            self._take(_walk(self.root, self._rules, self._excluded, path))
        elif not stat.S_ISREG(info.st_mode):
            self._tracker.forget(path)
            self._refuse(path, _file_kind(info.st_mode))
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
                self._refuse(path, _file_kind(info.st_mode))
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
            path = _relative_to(self.root, os.fsdecode(target)) if target else None
            if not path or _skipped(path, self._rules, self._excluded):
                continue
            with self._events_lock:
                (self._pending_dirs if event.is_directory else self._pending_files).add(path)

    def _listdir(self, folder: str | None) -> Iterator[os.DirEntry[str]]:
        """os.scandir for the polling observer, minus what we ignore (so it does not stat the
        thumbnails of a whole NAS every poll)."""
        folder = os.fspath(folder) if folder else self.root
        base = _relative_to(self.root, folder)
        with os.scandir(folder) as listing:
            for entry in listing:
                path = f"{base}/{entry.name}" if base else entry.name
                if base is None or not _skipped(path, self._rules, self._excluded):
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


# ---------------------------------------------------------------- --once


@dataclass(frozen=True)
class OnceResult:
    """What `run_once` found: files settled (in order), refused entries, paths still settling
    when it gave up (empty placeholders included), and whether the folder was there at all."""

    ready: list[ReadyFile]
    refused: list[Refusal]
    pending: list[str]
    available: bool


def run_once(
    root: str | os.PathLike[str],
    *,
    stable_seconds: float = 10.0,
    timeout_seconds: float = 300.0,
    patterns: Iterable[str] = (),
    exclude: Iterable[str | os.PathLike[str]] = (),
    known: Mapping[str, tuple[int, int, int]] | None = None,
    clock: Clock = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
    logger: logging.Logger | None = None,
) -> OnceResult:
    """Scan once and wait (at most `timeout_seconds`) until the files found have settled; files
    arriving meanwhile are left for the next run. Empty placeholders are not waited for."""
    ready: list[ReadyFile] = []
    refused: list[Refusal] = []
    watcher = Watcher(
        root,
        ready.append,
        refused.append,
        stable_seconds=stable_seconds,
        rescan_seconds=None,
        patterns=patterns,
        exclude=exclude,
        known=known,
        clock=clock,
        logger=logger,
    )
    deadline = clock() + timeout_seconds
    watcher.step()
    while watcher.available and any(v.size for v in watcher.pending().values()):
        due = watcher._tracker.next_due()
        now = clock()
        if now >= deadline:
            break
        sleep(max(0.0, min(deadline, due if due is not None else now) - now) or 0.01)
        watcher.step()
    return OnceResult(ready, refused, sorted(watcher.pending()), watcher.available)
