"""Model trust: when a model file's bytes are hashed, and what they must match to be used.

The policy, written once here: a model's expected SHA-256 is fixed once per preparation
(`TrustedModels.prepare`, or its first use through a `TrustedModels`). An id brings the hash
pinned in the registry or catalogue, and its cached file is hashed once against it; a file given
by path is hashed once and must keep that hash. After that no file is hashed again to decide
whether to trust it: every load reads the file once, hashes exactly the bytes it then
deserialises (`read_trusted`), and refuses them unless they have the expected hash, so nothing
can change between the check and the use. A mismatch is a `HashMismatchError` naming the model,
its file, the expected and the actual hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import HashMismatchError, ModelNotAvailableError
from pipeline.files import sha256_file
from pipeline.models.spec import ResolvedModel

if TYPE_CHECKING:
    import torch

    from pipeline.models.store import LoadedModel, ModelStore

__all__ = ["TrustedModels", "check_sha256", "fingerprint", "read_trusted"]


def check_sha256(what: str, expected: str, actual: str) -> None:
    """Refuse `what` unless its hash is the expected one: the one trust decision."""
    if actual != expected:
        raise HashMismatchError(what, expected, actual)


def fingerprint(path: str | os.PathLike[str]) -> str:
    """Hash a model file without loading it: to fix a path's hash, or to check a cached file
    against its pin before anything loads (start-up, `models verify`, `models fetch`)."""
    return sha256_file(path)


def read_trusted(path: Path, expected: str, what: str) -> bytes:
    """The file's bytes, read once and refused unless they hash to `expected`. The caller
    deserialises these very bytes: what was checked is what loads."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ModelNotAvailableError(f"{what}: {path} does not exist") from exc
    check_sha256(f"{what} ({path})", expected, hashlib.sha256(data).hexdigest())
    return data


class TrustedModels:
    """The models a prepared chain may load, each bound to the SHA-256 it must have.

    Stages get this as `StageContext.models`: `resolve`, `load` and `load_state_dict` answer as
    the store's do, but each ref's hash is fixed once per instance (a path is hashed on first
    use, or never when `expected` already names its hash, as in a worker) and every load checks
    the bytes it deserialises against that hash.
    """

    def __init__(self, store: ModelStore, expected: Mapping[str, str] | None = None) -> None:
        self.store = store
        self._expected: dict[str, str] = dict(expected or {})

    @classmethod
    def prepare(cls, store: ModelStore, refs: Iterable[str | os.PathLike[str]]) -> TrustedModels:
        """Bind every ref now, hashing each file once: a path's hash becomes the one it must
        keep; an id's cached file must have its pinned hash, so a tampered or truncated file
        stops a start rather than failing every image."""
        trusted = cls(store)
        ids = store.specs()
        for ref in dict.fromkeys(os.fspath(ref) for ref in refs):
            resolved = trusted.resolve(ref)  # a path is hashed here
            if ref in ids:
                what = f"model {resolved.id} ({resolved.path})"
                check_sha256(what, resolved.sha256, fingerprint(resolved.path))
        return trusted

    @property
    def cache_dir(self) -> Path:
        """The store's cache folder (converted models and engine calibrations live there)."""
        return self.store.cache_dir

    @property
    def expected(self) -> dict[str, str]:
        """Every ref bound so far -> its SHA-256: what a recipe records and a worker is given."""
        return dict(self._expected)

    def resolve(self, ref: str | os.PathLike[str]) -> ResolvedModel:
        text = os.fspath(ref)
        expected = self._expected.get(text)
        with _changed_since_bound(expected):
            resolved = self.store.resolve(text, sha256=expected)
        self._expected.setdefault(text, resolved.sha256)
        return resolved

    def load(
        self,
        ref: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LoadedModel:
        text = os.fspath(ref)
        expected = self._expected.get(text) or self.resolve(text).sha256
        with _changed_since_bound(expected):
            return self.store.load(text, device=device, dtype=dtype, sha256=expected)

    def load_state_dict(
        self, ref: str | os.PathLike[str]
    ) -> tuple[dict[str, torch.Tensor], ResolvedModel]:
        text = os.fspath(ref)
        expected = self._expected.get(text) or self.resolve(text).sha256
        with _changed_since_bound(expected):
            return self.store.load_state_dict(text, sha256=expected)


@contextlib.contextmanager
def _changed_since_bound(expected: str | None) -> Iterator[None]:
    """Say so when a file no longer has the hash it was bound to: it was replaced or altered
    after preparation, and outputs made from it would be misdescribed by their provenance."""
    try:
        yield
    except HashMismatchError as exc:
        if expected is None or exc.expected != expected:
            raise
        raise HashMismatchError(
            f"model {exc.what} changed since it was prepared", exc.expected, exc.actual
        ) from exc
