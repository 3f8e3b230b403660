"""For the review page's tests: a state folder made by a real daemon run (a tiny random model, a
restore stage that repairs drawn scratches, so there is an invented-pixel mask), and a real
`scanrestore serve` process on a free 127.0.0.1 port over it."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from conftest import shared_file
from modelfactory import tiny_compact

from daemon.cli import main

REPO = Path(__file__).resolve().parents[1]
SET5 = "corpus/sr_benchmark/Set5/HR"


class State:
    """A watched folder, an output folder, a state folder and a config file."""

    def __init__(
        self,
        root: Path,
        *,
        tile: int = 256,
        slow_model: bool = False,
        stages: list[dict[str, object]] | None = None,
        **web: object,
    ) -> None:
        self.root = root
        self.scans, self.out, self.state = root / "scans", root / "out", root / "state"
        self.scans.mkdir(parents=True, exist_ok=True)
        self.config = root / "config.toml"
        # A slow model (64 features, 16 convolutions) keeps a job running for seconds even on
        # an idle machine, so a test can watch it run; the default finishes in a blink.
        size = {"num_feat": 64, "num_conv": 16} if slow_model else {}
        model = tiny_compact(root / "tiny2x.pth", scale=2, **size)
        sections = {
            "models": {"cache_dir": str(root / "cache"), "auto_fetch": False},
            "processing": {"device": "cpu", "precision": "fp32", "threads": 1},
            "watch": {"input": str(self.scans), "output": str(self.out), "stable_seconds": 0.3},
            "daemon": {"state_dir": str(self.state), "max_attempts": 1, "lease_seconds": 30.0},
            "web": web,
        }
        lines = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        if stages is None:  # restore (a mask), then the tiny model's 2x
            stages = [
                {"kind": "restore", "sensitivity": 1.0},
                {"kind": "upscale", "model": str(model), "scale": 2.0, "tile": tile},
            ]
        for stage in stages:
            lines.append("[[pipeline.stages]]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in stage.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def cli(self, *args: str) -> int:
        return main(["--config", str(self.config), *args])

    def once(self) -> int:
        return self.cli("watch", "--once")

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.state / "scanrestore.db")

    def scalar(self, sql: str, *params: object) -> object:
        with contextlib_closing(self.db()) as db:
            return db.execute(sql, params).fetchone()[0]

    def drop_scratched(self, name: str, source: str = f"{SET5}/baby.png") -> Path:
        """A real photograph with thin bright scratches and specks drawn on it (what the
        restore stage repairs and records in the mask)."""
        from PIL import Image, ImageDraw

        image = Image.open(shared_file(source)).convert("RGB")
        draw = ImageDraw.Draw(image)
        draw.line([(40, 30), (200, 260)], fill=(255, 255, 255), width=2)
        for x, y in [(100, 400), (350, 200), (420, 90)]:
            draw.ellipse([x, y, x + 3, y + 3], fill=(255, 255, 255))
        target = self.scans / name
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
        return target

    def drop(self, name: str, source: str = f"{SET5}/bird.png") -> Path:
        target = self.scans / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(shared_file(source).read_bytes())
        return target

    def fingerprint(self) -> tuple[list[tuple[str, str]], dict[str, bytes]]:
        """Every table's rows and every file under the site: what must not change."""
        with contextlib_closing(self.db()) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            rows = [(t, repr(db.execute(f"SELECT * FROM {t}").fetchall())) for t in sorted(tables)]
        files = {
            str(p.relative_to(self.root)): p.read_bytes()
            for folder in (self.scans, self.out)
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        return rows, files


def contextlib_closing(db: sqlite3.Connection):
    import contextlib

    return contextlib.closing(db)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(
    state: State, *, host: str = "127.0.0.1", env: dict[str, str] | None = None
) -> Iterator[str]:
    """`scanrestore serve` as a real process; yields its base URL once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(state.config), "serve",
         "--host", host, "--port", str(port)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(f"serve exited {process.returncode}: {process.stderr.read()}")
            try:
                httpx.get(f"{url}/static/app.css", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise AssertionError("serve did not answer within 120 s") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
