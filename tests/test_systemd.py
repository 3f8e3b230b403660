"""daemon.systemd over a real AF_UNIX datagram socket, and systemd/scanrestore.service: its
directives, `systemd-analyze verify`, and `systemd-analyze security` exposure <= 3.0."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import systemd
from daemon.systemd import EXIT_CONFIG, Watchdog

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "scanrestore.service"
WORKER_UNIT = REPO / "systemd" / "scanrestore-worker.service"  # a cluster worker (daemon.cluster)
MAX_EXPOSURE = 3.0


# ---------------------------------------------------------------- sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named in $NOTIFY_SOCKET."""
    directory = tmp_path
    if len(str(tmp_path / "notify")) > 100:  # sun_path holds 108 bytes
        directory = Path(tempfile.mkdtemp(prefix="sd-"))
    path = directory / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock
    if directory != tmp_path:
        shutil.rmtree(directory)


def pending(sock: socket.socket) -> list[str]:
    """Every datagram already queued on `sock`, without waiting."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(10)


def test_notify_without_a_notify_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.watchdog_ping() is False


def test_ready_reaches_the_socket_path(notify_socket: socket.socket) -> None:
    assert systemd.ready() is True
    assert notify_socket.recv(4096) == b"READY=1"


def test_ready_with_a_status_sends_both_in_one_datagram(notify_socket: socket.socket) -> None:
    assert systemd.ready("watching /srv/scans")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=watching /srv/scans"


def test_status_is_kept_to_one_line(notify_socket: socket.socket) -> None:
    # A newline would end STATUS= and begin another assignment.
    assert systemd.status("3 queued,\n1 failed:\tWATCHDOG=1")
    assert notify_socket.recv(4096) == b"STATUS=3 queued, 1 failed: WATCHDOG=1"


def test_stopping_and_watchdog_messages(notify_socket: socket.socket) -> None:
    assert systemd.stopping("finishing photo-0007.tif")
    assert systemd.watchdog_ping()
    assert notify_socket.recv(4096) == b"STOPPING=1\nSTATUS=finishing photo-0007.tif"
    assert notify_socket.recv(4096) == b"WATCHDOG=1"


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"scanrestore-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.status("abstract")
        assert sock.recv(4096) == b"STATUS=abstract"


def test_notify_to_a_vanished_socket_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.ready() is False
    assert "sd_notify to" in caplog.text and "gone" in caplog.text


def test_notify_ignores_a_transport_it_does_not_speak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("500000", "self", 0.5),
        ("30000000", "1", None),  # another process is the one to ping
        (None, None, None),
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert systemd.watchdog_interval() == expected
    watchdog = Watchdog.from_environment()
    assert (watchdog.interval if watchdog else None) == expected


class Health:
    """Answers from a script, then False; `done` is set once the script is used up."""

    def __init__(self, *answers: bool | Exception) -> None:
        self._answers = list(answers)
        self.done = threading.Event()

    def __call__(self) -> bool:
        if not self._answers:
            self.done.set()
            return False
        answer = self._answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_watchdog_pings_at_half_the_interval_until_stopped(notify_socket: socket.socket) -> None:
    watchdog = Watchdog(0.02, lambda: True)
    with watchdog:
        for _ in range(3):
            assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert watchdog._thread is None  # joined


def test_watchdog_withholds_pings_while_unhealthy_and_resumes(
    notify_socket: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    health = Health(True, True, False, RuntimeError("database locked"), True)
    with caplog.at_level(logging.WARNING, logger="daemon.systemd"), Watchdog(0.02, health):
        assert health.done.wait(10)
    # Pings are sent before the next check, so all of them are queued by now.
    assert pending(notify_socket) == ["WATCHDOG=1"] * 3
    assert "withholding watchdog pings" in caplog.text
    assert "health check raised" in caplog.text and "database locked" in caplog.text
    assert "pings resumed" in caplog.text


def test_watchdog_rejects_a_nonpositive_interval_and_a_second_start() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        Watchdog(0)
    watchdog = Watchdog(60, ping=lambda: True)
    with watchdog, pytest.raises(RuntimeError, match="already started"):
        watchdog.start()


# ---------------------------------------------------------------- the unit file


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in a unit file, repeated keys kept."""
    found, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"continuation lines make this test blind: {line}"
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(section: str, key: str) -> list[str]:
    return [v for s, k, v in directives(UNIT) if (s, k) == (section, key)]


REQUIRED = {
    ("Unit", "StartLimitIntervalSec"): None,
    ("Unit", "StartLimitBurst"): None,
    ("Service", "Type"): "notify",
    ("Service", "NotifyAccess"): "main",
    ("Service", "WatchdogSec"): None,
    ("Service", "Restart"): "on-failure",
    ("Service", "RestartPreventExitStatus"): str(EXIT_CONFIG),
    ("Service", "KillMode"): "mixed",
    ("Service", "TimeoutStopSec"): None,
    ("Service", "User"): "scanrestore",
    ("Service", "UMask"): "0027",
    ("Service", "StateDirectory"): "scanrestore",
    ("Service", "CacheDirectory"): "scanrestore",
    ("Service", "Nice"): None,
    ("Service", "IOSchedulingClass"): "idle",
    ("Service", "MemoryHigh"): None,
    ("Service", "MemoryMax"): None,
    ("Service", "ProtectSystem"): "strict",
    ("Service", "ReadWritePaths"): "/srv/scanrestore/output",
    ("Service", "ReadOnlyPaths"): "/srv/scanrestore/scans",
    ("Service", "ProtectHome"): "yes",
    ("Service", "PrivateTmp"): "yes",
    ("Service", "NoNewPrivileges"): "yes",
    ("Service", "CapabilityBoundingSet"): "",
    ("Service", "PrivateUsers"): "yes",
    ("Service", "ProtectKernelTunables"): "yes",
    ("Service", "ProtectKernelModules"): "yes",
    ("Service", "ProtectKernelLogs"): "yes",
    ("Service", "ProtectControlGroups"): "yes",
    ("Service", "ProtectHostname"): "yes",
    ("Service", "ProtectProc"): "invisible",
    ("Service", "RestrictNamespaces"): "yes",
    ("Service", "RestrictRealtime"): "yes",
    ("Service", "RestrictSUIDSGID"): "yes",
    ("Service", "LockPersonality"): "yes",
    ("Service", "RestrictAddressFamilies"): "AF_UNIX AF_INET AF_INET6",
    ("Service", "SystemCallArchitectures"): "native",
}


@pytest.mark.parametrize(("where", "expected"), list(REQUIRED.items()), ids=lambda x: str(x))
def test_unit_sets_each_required_directive(where: tuple[str, str], expected: str | None) -> None:
    found = values(*where)
    assert len(found) == 1, f"{where}: expected once, found {found}"
    if expected is not None:
        assert found[0] == expected
    else:
        assert found[0], f"{where} is empty"


def test_unit_runs_the_watch_command_with_the_system_config() -> None:
    (command,) = values("Service", "ExecStart")
    assert command.split()[0].endswith("/scanrestore")
    assert command.split()[1:] == ["watch", "--config", "/etc/scanrestore/config.toml"]


def test_unit_filters_system_calls_to_a_service_set_without_privileged_ones() -> None:
    assert values("Service", "SystemCallFilter") == ["@system-service", "~@privileged"]
    assert values("Service", "SystemCallErrorNumber") == ["EPERM"]


def test_unit_leaves_out_what_breaks_cuda_and_pytorch() -> None:
    keys = {key for _, key, _ in directives(UNIT)}
    # PrivateDevices/DeviceAllow/DevicePolicy close /dev/nvidia*; before systemd 253 so does
    # ProtectClock (it implies a device allow-list); ProcSubset=pid hides /proc/driver/nvidia;
    # MemoryDenyWriteExecute forbids the JIT code PyTorch and CUDA generate.
    for key in (
        "PrivateDevices",
        "DeviceAllow",
        "DevicePolicy",
        "ProtectClock",
        "ProcSubset",
        "MemoryDenyWriteExecute",
        "DynamicUser",
    ):
        assert key not in keys


def test_scan_folder_is_never_writable() -> None:
    writable = " ".join(values("Service", "ReadWritePaths")).split()
    readonly = " ".join(values("Service", "ReadOnlyPaths")).split()
    assert "/srv/scanrestore/scans" in readonly
    assert not any(path.startswith("/srv/scanrestore/scans") for path in writable)


def test_exit_config_is_ex_config() -> None:
    assert EXIT_CONFIG == 78  # sysexits.h; systemd's own name for it is "CONFIG"


# ---------------------------------------------------------------- systemd-analyze


def _analyze_version(path: str) -> int:
    first = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    match = re.match(r"systemd (\d+)", first)
    return int(match[1]) if match else 0


def _install_systemd() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "systemd"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="module")
def analyze() -> str:
    """systemd-analyze with --offline (systemd >= 250); in CI, as root, Debian's is installed."""
    path = shutil.which("systemd-analyze")
    if path is None or _analyze_version(path) < 250:
        can_install = os.geteuid() == 0 and os.environ.get("CI") == "true"
        if not can_install or shutil.which("apt-get") is None:
            pytest.skip(
                "needs systemd-analyze from systemd >= 250 (for --offline); with CI=true as "
                "root on Debian the test installs the systemd package itself"
            )
        _install_systemd()
        path = shutil.which("systemd-analyze")
        assert path is not None and _analyze_version(path) >= 250, "installed systemd too old"
    return path


@pytest.mark.parametrize("unit", [UNIT, WORKER_UNIT], ids=lambda unit: unit.name)
def test_security_exposure_is_at_most_3(analyze: str, unit: Path) -> None:
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(
        rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", result.stdout
    )
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    exposures = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert float(match[1]) <= MAX_EXPOSURE, "\n".join(exposures)


@pytest.mark.parametrize("unit", [UNIT, WORKER_UNIT], ids=lambda unit: unit.name)
def test_verify_finds_nothing_but_the_missing_binary(
    analyze: str, tmp_path: Path, unit: Path
) -> None:
    # verify checks that ExecStart's binary exists; this machine has no installed daemon, so
    # the unit is verified once as shipped (that must be its only complaint) and once with the
    # binary swapped for one that exists (then there must be none: no unknown key, no typo).
    original = subprocess.run(
        [analyze, "verify", "--no-pager", str(unit)], capture_output=True, text=True, timeout=120
    )
    (executable,) = [
        v.split()[0] for s, k, v in directives(unit) if (s, k) == ("Service", "ExecStart")
    ]
    complaints = (original.stdout + original.stderr).strip().splitlines()
    if Path(executable).exists():  # installed here: nothing to complain about
        assert complaints == []
    else:
        assert len(complaints) == 1 and f"Command {executable} is not executable" in complaints[0]
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(executable, str(shutil.which("true"))))
    checked = subprocess.run(
        [analyze, "verify", "--no-pager", str(copy)], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), (
        checked.stdout + checked.stderr
    )
