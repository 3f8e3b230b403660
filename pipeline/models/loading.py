"""Safe loading: weights deserialised without executing code (safetensors or torch's weights-only
unpickler), then unwrapped from the containers upstream training code saves them in."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pipeline.errors import HashMismatchError, ModelError, ModelNotAvailableError

if TYPE_CHECKING:
    import torch

__all__ = ["deserialize", "is_safetensors", "read_verified", "unwrap", "unwrap_state_dict"]

_WRAPPER_KEYS = ("params_ema", "params", "state_dict")


def is_safetensors(head: bytes) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header itself.
    return len(head) >= 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def deserialize(handle: IO[bytes], what: str) -> dict[str, Any]:
    """Read weights without executing code: safetensors, or torch's weights-only unpickler.

    spandrel's `load_from_file` is avoided on purpose: it hands `.pt` files to `torch.jit.load`.
    """
    import torch

    head = handle.read(16)
    handle.seek(0)
    try:
        if is_safetensors(head):
            from safetensors.torch import load as load_safetensors

            data: object = load_safetensors(handle.read())
        else:
            data = torch.load(handle, map_location="cpu", weights_only=True)
    # The bytes are untrusted input: whatever the unpickler or parser throws means "not weights".
    except Exception as exc:
        raise ModelError(f"{what}: not a loadable weights file: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{what}: holds a {type(data).__name__}, not a state dict")
    return data


def read_verified(path: Path, expected: str | None, what: str) -> tuple[dict[str, Any], str]:
    """Hash then deserialize through one open file, so the bytes checked are the bytes loaded."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the `with` below
    except FileNotFoundError as exc:
        raise ModelNotAvailableError(f"{what}: {path} does not exist") from exc
    with handle:
        actual = hashlib.file_digest(handle, "sha256").hexdigest()
        if expected is not None and actual != expected:
            raise HashMismatchError(f"{what} ({path})", expected, actual)
        handle.seek(0)
        return deserialize(handle, f"{what} ({path})"), actual


def unwrap(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The weights inside upstream's wrappers: EMA weights first, DataParallel's `module.` off."""
    for key in _WRAPPER_KEYS:
        inner = data.get(key)
        if isinstance(inner, Mapping):
            data = inner
            break
    if data and all(isinstance(key, str) and key.startswith("module.") for key in data):
        data = {key.removeprefix("module."): value for key, value in data.items()}
    return data


def unwrap_state_dict(data: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    """`_unwrap`, insisting that what is left is tensors and nothing else."""
    import torch

    unwrapped = unwrap(data)
    for key, value in unwrapped.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"{what}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(unwrapped)
