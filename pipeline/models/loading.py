"""Safe loading: weights deserialised without executing code (safetensors or torch's weights-only
unpickler) from bytes checked against their hash, then unwrapped from upstream's containers."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ModelError
from pipeline.models.trust import read_trusted

if TYPE_CHECKING:
    import torch

__all__ = ["deserialize", "is_safetensors", "load_weights", "unwrap", "unwrap_state_dict"]

_WRAPPER_KEYS = ("params_ema", "params", "state_dict")


def is_safetensors(head: bytes) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header itself.
    return len(head) >= 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def deserialize(data: bytes, what: str) -> dict[str, Any]:
    """Weights from bytes, without executing code: safetensors, or torch's weights-only unpickler.

    spandrel's `load_from_file` is avoided on purpose: it hands `.pt` files to `torch.jit.load`.
    """
    import torch

    try:
        if is_safetensors(data[:16]):
            from safetensors.torch import load as load_safetensors

            loaded: object = load_safetensors(data)
        else:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    # The bytes are untrusted input: whatever the unpickler or parser throws means "not weights".
    except Exception as exc:
        raise ModelError(f"{what}: not a loadable weights file: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ModelError(f"{what}: holds a {type(loaded).__name__}, not a state dict")
    return loaded


def load_weights(path: Path, expected: str, what: str) -> dict[str, Any]:
    """The state dict in `path`, deserialised from the very bytes checked against `expected`."""
    return deserialize(read_trusted(path, expected, what), f"{what} ({path})")


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
