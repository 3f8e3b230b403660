"""Running the page: `scanrestore serve` in the foreground, or, for `scanrestore watch` with
`[web] enabled`, a child process of its own (a slow browser or a big preview never holds up
the daemon's loop, and the child dies with the daemon)."""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

from daemon.config import Config
from daemon.web.security import check_bind, effective_token

__all__ = ["WebServer", "serve", "start_child", "url_of"]

log = logging.getLogger("scanrestore.web")


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _roots(config: Config):  # -> Roots (imported late: views pulls in numpy and the store)
    from daemon.service import state_dir
    from daemon.web.views import Roots

    return Roots(
        input=Path(config.watch.input).expanduser().resolve(),
        output=Path(config.watch.output).expanduser().resolve(),
        state=state_dir(config).expanduser().resolve(),
    )


def serve(config: Config, *, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM. TokenRequiredError (before binding) for a non-loopback
    address without a token."""
    import uvicorn

    from daemon.web.app import create_app

    host = host or config.web.host
    port = config.web.port if port is None else port
    token = effective_token(config.web.token)
    check_bind(host, token)
    roots = _roots(config)
    roots.state.mkdir(parents=True, exist_ok=True)
    app = create_app(config, roots, token=token, host=host)
    log.warning("review page at %s", url_of(host, port))
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


def _child(config_json: dict, parent: int) -> None:
    from daemon.worker_entry import die_with_parent

    die_with_parent(parent)
    serve(Config.model_validate(config_json))


class WebServer:
    """The page served by a child process for as long as the daemon runs."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def start_child(config: Config) -> WebServer:
    """Start the page in a spawned child; the token rule is checked here first, so a daemon
    told to serve a public address without a token does not start at all."""
    check_bind(config.web.host, effective_token(config.web.token))
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=_child,
        args=(config.model_dump(mode="json"), os.getpid()),
        name="scanrestore-web",
        daemon=True,
    )
    process.start()
    log.info("review page at %s", url_of(config.web.host, config.web.port))
    return WebServer(process)
