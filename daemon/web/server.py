"""Running the page in a process of its own that never imports the pipeline's neural-network
libraries (torch alone is most of a gigabyte resident): `scanrestore serve` validates the
config and then becomes that process (exec), and `scanrestore watch` with `[web] enabled` starts
it as a child that dies with the daemon (a slow browser or a big preview never holds up the
daemon's loop). The config travels in the environment, never on the command line, since it
may hold the token."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from daemon.config import Config, state_dir
from daemon.web.security import check_bind, effective_token

__all__ = ["CONFIG_ENV", "WebServer", "exec_server", "serve", "start_child", "url_of"]

log = logging.getLogger("scanrestore.web")

CONFIG_ENV = "SCANRESTORE_WEB_CONFIG"  # the validated config as JSON
PARENT_ENV = "SCANRESTORE_WEB_PARENT"  # the daemon's pid: the child dies with it


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(config: Config, *, host: str | None = None, port: int | None = None) -> None:
    """Serve in this process until SIGINT/SIGTERM. TokenRequiredError (before binding) for a
    non-loopback address without a token."""
    import uvicorn

    from daemon.web.app import create_app
    from daemon.web.views import Roots

    host = host or config.web.host
    port = config.web.port if port is None else port
    token = effective_token(config.web.token)
    check_bind(host, token)
    roots = Roots(
        input=Path(config.watch.input).expanduser().resolve(),
        output=Path(config.watch.output).expanduser().resolve(),
        state=state_dir(config).expanduser().resolve(),
    )
    roots.state.mkdir(parents=True, exist_ok=True)
    app = create_app(config, roots, token=token, host=host)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        server_header=False,
        limit_concurrency=64,
        timeout_graceful_shutdown=5,
    )


def _command(config: Config, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    argv = [sys.executable, "-m", "daemon.web", "--host", host, "--port", str(port)]
    env = {**os.environ, CONFIG_ENV: json.dumps(config.model_dump(mode="json"))}
    return argv, env


def exec_server(config: Config, *, host: str, port: int) -> None:
    """Become the server process (`scanrestore serve`): same pid, none of this process's
    imports. Checks the token rule first, so its error comes from the command itself."""
    check_bind(host, effective_token(config.web.token))
    argv, env = _command(config, host, port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


class WebServer:
    """The page served by a child process for as long as the daemon runs."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_child(config: Config) -> WebServer:
    """Start the page in a child process; the token rule is checked here first, so a daemon
    told to serve a public address without a token does not start at all."""
    check_bind(config.web.host, effective_token(config.web.token))
    argv, env = _command(config, config.web.host, config.web.port)
    env[PARENT_ENV] = str(os.getpid())
    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
    log.info("review page at %s", url_of(config.web.host, config.web.port))
    return WebServer(process)
