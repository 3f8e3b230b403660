"""Who holds a lease: the process identity a running job records (host, boot, pid, start
time) and whether that process still lives, asked from the same machine."""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

__all__ = ["UNKNOWN", "ProcessId", "process_alive"]

UNKNOWN = "-"  # a field the platform cannot tell


@dataclass(frozen=True)
class ProcessId:
    """Who holds a lease, precisely enough to tell from the same machine whether it still
    lives: host, boot, pid and the process's start time (so a reused pid is not mistaken for
    the owner). `UNKNOWN` fields where the platform cannot say."""

    host: str
    boot: str
    pid: int
    started: str

    @classmethod
    def current(cls) -> ProcessId:
        pid = os.getpid()
        return cls(socket.gethostname(), _boot_id(), pid, _start_ticks(pid) or UNKNOWN)

    @classmethod
    def parse(cls, text: str) -> ProcessId:
        host, boot, pid, started = text.split(" ")
        return cls(host, boot, int(pid), started)

    def __str__(self) -> str:
        return f"{self.host} {self.boot} {self.pid} {self.started}"


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip() or UNKNOWN
    except OSError:
        return UNKNOWN


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None if it is not running
    (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def process_alive(holder: ProcessId) -> bool:
    """Whether the lease holder still runs, asked from the same host and boot."""
    if holder.started != UNKNOWN and os.path.isdir("/proc/self"):
        return _start_ticks(holder.pid) == holder.started
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
