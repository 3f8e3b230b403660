"""What the cluster tests run: a real Redis (Debian's redis-server) on a free loopback port with
its own folder, a coordinator daemon and `scanrestore worker` processes as real subprocesses,
each worker with its own model cache and seeing the shared folders under another path than the
coordinator (a private bind mount hiding the coordinator's path where the tests run as root,
a symbolic link elsewhere), so the path map is always exercised."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server")
NO_REDIS = (
    "redis-server is not installed and cannot be here (scripts/setup installs Debian's "
    "redis-server when run as root)"
)


def wait_for(predicate: Callable[[], object], timeout: float = 120.0, what: str = "it") -> None:
    """Poll a condition (never a fixed sleep) until it holds, or fail naming it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """redis-server on 127.0.0.1:PORT with its own folder, no persistence: a restart loses
    every key and message, the worst a broker restart can do."""

    def __init__(self, folder: Path) -> None:
        assert REDIS_SERVER is not None
        self.folder = folder
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        log = open(self.folder / "redis.log", "a")  # noqa: SIM115 (kept open by the server)
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.folder), "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(up, 30, "redis-server to answer PING")
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(port=self.port, socket_connect_timeout=2, socket_timeout=5)


def _can_hide_paths() -> bool:
    """Whether workers can get a private mount namespace (root, with unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


HIDE_PATHS = _can_hide_paths()


class Cluster:
    """A coordinator's folders (`nas/scans`, `nas/restored`, its state and cache) and the
    workers' view of them under `mnt/`."""

    def __init__(
        self,
        root: Path,
        redis: RedisServer | None,
        model: Path,
        *,
        local_workers: int = 1,
        **cluster: object,
    ) -> None:
        self.root = root.resolve()
        self.redis = redis
        self.nas = self.root / "nas"
        self.scans, self.out = self.nas / "scans", self.nas / "restored"
        self.state = self.root / "state"
        self.mnt = self.root / "mnt"
        self.scans.mkdir(parents=True)
        self.out.mkdir(parents=True)
        if HIDE_PATHS:
            self.mnt.mkdir()
        else:
            self.mnt.symlink_to(self.nas)
        self.model = model
        self.local_workers = local_workers  # used only without a broker (redis None)
        self.cluster = {
            "broker": redis.url if redis is not None else "",
            "heartbeat_seconds": 0.3,
            "worker_timeout": 6.0,
            "pickup_seconds": 10.0,
            "visibility_timeout": 60.0,
            "prefix": "t",
            **cluster,
        }
        self.config = self._config("coordinator", {})
        self.coordinator: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------ configs and models

    def _config(self, name: str, extra: dict) -> Path:
        cache = self.root / f"cache-{name}"
        _import_model(cache, self.model)
        sections = {
            "models": {"cache_dir": str(cache), "auto_fetch": False},
            "processing": {"device": "cpu", "precision": "fp32", "threads": 1},
            "watch": {
                "input": str(self.scans),
                "output": str(self.out),
                "stable_seconds": 0.2,
                "mode": "polling",
            },
            "daemon": {
                "state_dir": str(self.state),
                "stop_timeout": 10.0,
                "lease_seconds": 30.0,
                "mask_sidecar": False,
                "workers": self.local_workers,
            },
            "schedule": {"fixity_at": "", "backup_at": ""},
            "cluster": {**self.cluster, **extra},
        }
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
        lines += ["[[pipeline.stages]]", 'kind = "upscale"', 'model = "tiny"', "scale = 2.0"]
        path = self.root / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def tamper(self, name: str) -> None:
        """Alter the worker's cached weights after import: its recorded hash no longer holds."""
        from pipeline.models import ModelStore

        store = ModelStore(self.root / f"cache-{name}", auto_fetch=False)
        with open(store.path_for(store.specs()["tiny"]), "ab") as handle:
            handle.write(b"tampered")

    # ------------------------------------------------------------ processes

    def start_coordinator(self) -> subprocess.Popen:
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(self.config), "-v", "watch"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "coordinator.log", "a"),  # noqa: SIM115
        )
        return self.coordinator

    def worker_config(self, name: str) -> Path:
        return self._config(name, {"path_map": {str(self.nas): str(self.mnt)}})

    def start_worker(self, name: str, *, tampered: bool = False) -> subprocess.Popen:
        config = self.worker_config(name)
        if tampered:
            self.tamper(name)
        command = [sys.executable, "-m", "daemon", "--config", str(config), "-v", "worker",
                   "--name", name, "--device", "cpu"]  # fmt: skip
        if HIDE_PATHS:  # the coordinator's path does not exist for this worker
            inner = (
                f"mount --bind {self.nas} {self.mnt} && mount -t tmpfs none {self.nas} && "
                f"exec {' '.join(command)}"
            )
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / f"worker-{name}.log", "a"),  # noqa: SIM115
        )
        self.workers[name] = process
        wait_for(lambda: name in self.beats() or process.poll() is not None, 120,
                 f"worker {name}'s first heartbeat")  # fmt: skip
        assert process.poll() is None, self.log(f"worker-{name}")
        return process

    def stop_all(self) -> None:
        for process in [*self.workers.values(), self.coordinator]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers.values(), self.coordinator]:
            if process is None:
                continue
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------ what happened

    def beats(self) -> dict[str, dict]:
        if self.redis is None:
            return {}
        try:
            with self.redis.client() as client:
                rows = client.hgetall("t:workers")
        except Exception:  # the broker is down (restart tests)
            return {}
        return {name.decode(): json.loads(text) for name, text in rows.items()}

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        database = self.state / "scanrestore.db"
        if not database.exists():
            return []
        with sqlite3.connect(database, timeout=30) as conn:
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError:  # not yet migrated
                return []

    def done(self) -> int:
        rows = self.query("SELECT count(*) FROM jobs WHERE state = 'done'")
        return rows[0][0] if rows else 0

    def images(self) -> list[Path]:
        return sorted(p for p in self.out.rglob("*.v*.png") if not p.name.startswith("._"))

    def temporaries(self) -> list[Path]:
        return [p for p in self.out.rglob("._*") if ".tmp-" in p.name]


def _import_model(cache: Path, model: Path) -> None:
    from pipeline.models import ModelStore

    if not cache.exists():
        ModelStore(cache, auto_fetch=False).import_file(model, model_id="tiny")


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)
