"""The broker side, in Redis: the Celery app that carries task messages, and the keys beside
it that make a run exactly-once (one claim per run token), carry results back and hold each
worker's heartbeat. Key layout, under the configured prefix P:

- `P:claim:TOKEN`: who runs the dispatch TOKEN: a worker's ident, or "revoked" once the
  coordinator gave the run up. Set once (NX) by the worker that takes it; a redelivered
  message finds it taken and is dropped, so a task message may arrive any number of times.
- `P:results`: a list of RemoteResult JSON, pushed by workers, popped by the coordinator.
- `P:workers`: a hash, worker name -> Beat JSON.
- Celery queue `P.worker.NAME`: the task messages for one worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.cluster.messages import Beat, RemoteResult
from daemon.config import ClusterConfig

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["REVOKED", "TASK_NAME", "Broker", "BrokerError", "celery_app"]

TASK_NAME = "scanrestore.process"
REVOKED = "revoked"
_CLAIM_SECONDS = 7 * 24 * 3600  # far longer than any redelivery of the same message


class BrokerError(Exception):
    """Redis cannot be reached (or answered an error); whatever was asked did not happen."""


class Broker:
    """The exactly-once keys and the heartbeats, over one Redis connection pool."""

    def __init__(self, url: str, prefix: str, *, socket_timeout: float = 10.0) -> None:
        import redis

        self.prefix = prefix
        self.redis = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=5.0
        )
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)

    def worker_queue(self, name: str) -> str:
        return f"{self.prefix}.worker.{name}"

    def claim(self, token: str, ident: str) -> bool:
        """Take run `token` for worker `ident`; False when someone holds it or it was revoked."""
        return bool(self._do(self.redis.set, self._claim(token), ident, nx=True, ex=_CLAIM_SECONDS))

    def holder(self, token: str) -> str | None:
        value = self._do(self.redis.get, self._claim(token))
        return value.decode() if value is not None else None

    def revoke(self, token: str, *, unless_taken: bool = False) -> tuple[bool, str | None]:
        """Give run `token` up: no worker may take it from now on, and one that runs it stops
        and has its result discarded. With `unless_taken`, only when no worker has taken it.
        Returns (revoked, the previous holder)."""
        key = self._claim(token)
        if unless_taken:
            if self._do(self.redis.set, key, REVOKED, nx=True, ex=_CLAIM_SECONDS):
                return True, None
            return False, self.holder(token)
        previous = self._do(self.redis.set, key, REVOKED, ex=_CLAIM_SECONDS, get=True)
        return True, previous.decode() if previous is not None else None

    def push_result(self, result: RemoteResult) -> None:
        self._do(self.redis.rpush, f"{self.prefix}:results", result.to_json())

    def pop_results(self, timeout: float) -> list[RemoteResult]:
        """Results pushed so far, waiting up to `timeout` seconds for the first."""
        key = f"{self.prefix}:results"
        first = self._do(self.redis.blpop, [key], timeout=timeout) if timeout > 0 else None
        raw = [first[1]] if first else []
        while rest := self._do(self.redis.lpop, key, 100):
            raw += rest
        return [RemoteResult.from_json(item) for item in raw]

    def write_beat(self, beat: Beat) -> None:
        self._do(self.redis.hset, f"{self.prefix}:workers", beat.name, beat.to_json())

    def remove_beat(self, name: str) -> None:
        self._do(self.redis.hdel, f"{self.prefix}:workers", name)

    def beats(self) -> dict[str, Beat]:
        rows = self._do(self.redis.hgetall, f"{self.prefix}:workers")
        return {name.decode(): Beat.from_json(text) for name, text in rows.items()}

    def close(self) -> None:
        self.redis.close()

    def _claim(self, token: str) -> str:
        return f"{self.prefix}:claim:{token}"

    def _do(self, call, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return call(*args, **kwargs)
        except self._errors as exc:
            raise BrokerError(f"Redis: {exc}") from exc


def celery_app(cluster: ClusterConfig) -> Celery:
    """The Celery app both sides use: JSON messages, acknowledged after the task (a worker that
    dies mid-run leaves its message to be redelivered, and dropped by the claim), one message
    at a time per worker, no result backend (results travel as RemoteResult)."""
    from celery import Celery

    restore = max(1, int(min(10.0, cluster.visibility_timeout / 2)))
    app = Celery("scanrestore", broker=cluster.broker, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": cluster.visibility_timeout,
            "unacked_restore_interval": restore,
            "unacked_restore_throttle": 1,
            "socket_timeout": 10.0,
            "socket_connect_timeout": 5.0,
        },
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
    )
    return app
