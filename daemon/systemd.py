"""systemd integration without dependencies: sd_notify (READY, STATUS, STOPPING, WATCHDOG) over
$NOTIFY_SOCKET, the watchdog interval from $WATCHDOG_USEC, and a thread that pings while healthy."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

__all__ = [
    "EXIT_CONFIG",
    "Watchdog",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_ping",
]

log = logging.getLogger(__name__)

#: Exit status for an invalid configuration (sysexits.h EX_CONFIG). The unit lists it in
#: RestartPreventExitStatus=, so systemd does not restart a daemon that cannot start.
EXIT_CONFIG = 78


def notify(state: str) -> bool:
    """Send `state` (newline-separated VAR=value assignments) to the service manager.

    False when not started by systemd with a notify socket ($NOTIFY_SOCKET unset), or when the
    message could not be delivered; a service must keep running either way.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # abstract namespace: a leading NUL byte instead of '@'
        address = "\0" + address[1:]
    elif not address.startswith("/"):  # unset, or a transport we do not speak (vsock:)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address.replace("\0", "@"), exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Start-up is complete (Type=notify units stay "activating" until this)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def status(text: str) -> bool:
    """A one-line status that `systemctl status` shows."""
    return notify(f"STATUS={_one_line(text)}")


def stopping(status_text: str | None = None) -> bool:
    """Shutdown has begun (the unit shows "deactivating" while a running image finishes)."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def watchdog_ping() -> bool:
    """Tell the manager the service is alive; it must come within every WatchdogSec=."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects a ping (WatchdogSec=), or None when none is expected.

    A child process inherits the environment but not the duty: $WATCHDOG_PID, when set, names the
    one process that must ping.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


def _one_line(text: str) -> str:
    # A newline would end the STATUS= assignment and start a bogus one.
    return " ".join(text.split())


class Watchdog:
    """A thread that pings the watchdog every half interval while `healthy()` returns True.

    When `healthy()` returns False or raises, the ping is withheld (and the reason logged), so a
    wedged daemon is killed and restarted by systemd after WatchdogSec=; pings resume if it
    recovers in time. `stop()` ends and joins the thread.
    """

    def __init__(
        self,
        interval: float,
        healthy: Callable[[], bool] = lambda: True,
        *,
        ping: Callable[[], bool] = watchdog_ping,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"watchdog interval must be > 0, got {interval}")
        self.interval = interval
        self._healthy = healthy
        self._ping = ping
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_environment(cls, healthy: Callable[[], bool] = lambda: True) -> Watchdog | None:
        """A watchdog at the interval systemd asked for; None when the unit has no WatchdogSec=."""
        interval = watchdog_interval()
        return cls(interval, healthy) if interval else None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("watchdog already started")
        # A daemon thread, so that a crash elsewhere still ends the process (and the pings).
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        was_healthy = True
        while not self._stop.is_set():
            is_healthy = self._check()
            if is_healthy:
                self._ping()
            if is_healthy != was_healthy:
                log.warning(
                    "health check passes again: watchdog pings resumed"
                    if is_healthy
                    else "health check failed: withholding watchdog pings"
                )
            was_healthy = is_healthy
            self._stop.wait(self.interval / 2)

    def _check(self) -> bool:
        try:
            return bool(self._healthy())
        except Exception:
            log.exception("health check raised")
            return False
