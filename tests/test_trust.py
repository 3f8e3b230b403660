"""The model trust policy (pipeline.models.trust): hashes fixed once per preparation, bytes
verified as they load, real model files throughout."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from modelfactory import nearest_compact

from pipeline.chain import build_chain
from pipeline.errors import HashMismatchError
from pipeline.files import sha256_file
from pipeline.image import Image, Metadata
from pipeline.models import ModelStore, TrustedModels, loading, trust
from pipeline.stage import StageContext


def _image() -> Image:
    pixels = np.linspace(0, 1, 16 * 12 * 3, dtype=np.float32).reshape(12, 16, 3)
    return Image(pixels=pixels, alpha=None, bit_depth=8, format="png", metadata=Metadata())


class HashCounter:
    """Counts, per model file, the whole-file hashes (`fingerprint`) and the hashes of bytes
    read to be deserialised (`read_trusted`), by wrapping the two hash calls trust makes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
        self.size = path.stat().st_size
        self.path = path.resolve()
        self.files: Counter[Path] = Counter()
        self.loads = 0
        real_file_hash = trust.sha256_file

        def file_hash(target, **kwargs):
            self.files[Path(target).resolve()] += 1
            return real_file_hash(target, **kwargs)

        counter = self

        class CountingHashlib:
            @staticmethod
            def sha256(data: bytes = b""):
                counter.loads += len(data) == counter.size
                return hashlib.sha256(data)

        monkeypatch.setattr(trust, "sha256_file", file_hash)
        monkeypatch.setattr(trust, "hashlib", CountingHashlib)

    @property
    def fingerprints(self) -> int:
        return self.files[self.path]


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "cache", auto_fetch=False)


def test_a_path_model_is_hashed_once_per_preparation_not_per_task(tmp_path, store, monkeypatch):
    weights = nearest_compact(tmp_path / "nearest.pth", scale=2)
    counted = HashCounter(monkeypatch, weights)
    chain = build_chain([{"kind": "upscale", "model": str(weights), "scale": 2.0, "tile": 0}])
    models = chain.prepare_models(store)
    assert counted.fingerprints == 1
    assert models.expected == {str(weights): sha256_file(weights)}
    ctx = StageContext(models=models, device="cpu", precision="fp32")

    chain.run(_image(), ctx)  # the first task builds the model: one verified read
    after_first = (counted.fingerprints, counted.loads)
    for _ in range(3):  # more tasks, each asking for the model as stages do
        chain.run(_image(), ctx)
        assert models.resolve(str(weights)).sha256 == models.expected[str(weights)]
        models.load(str(weights))
    assert (counted.fingerprints, counted.loads) == after_first
    assert counted.fingerprints == 1  # hashed when prepared, never again
    # Architecture detection at preparation and the build read the file, each checking the
    # very bytes it deserialises; neither repeats per task.
    assert counted.loads == 2


def test_a_worker_given_the_hashes_never_hashes_the_file_to_trust_it(tmp_path, store, monkeypatch):
    weights = nearest_compact(tmp_path / "nearest.pth", scale=2)
    expected = sha256_file(weights)
    counted = HashCounter(monkeypatch, weights)
    models = TrustedModels(store, {str(weights): expected})
    for _ in range(3):
        assert models.resolve(str(weights)).sha256 == expected
        assert models.load(str(weights)).sha256 == expected
    assert counted.fingerprints == 0
    assert counted.loads == 2  # detection, then the build; memoised afterwards


def test_a_path_model_altered_between_prepare_and_load_is_refused(tmp_path, store):
    weights = nearest_compact(tmp_path / "nearest.pth", scale=2)
    models = TrustedModels.prepare(store, [str(weights)])
    expected = sha256_file(weights)
    nearest_compact(weights, scale=2, seed=1)  # other weights under the same name
    with pytest.raises(HashMismatchError) as caught:
        models.load(str(weights))
    assert (caught.value.expected, caught.value.actual) == (expected, sha256_file(weights))
    message = str(caught.value)
    assert str(weights) in message and "changed since it was prepared" in message
    assert f"expected {expected}, got {sha256_file(weights)}" in message


def test_a_cached_model_altered_between_prepare_and_load_is_refused(tmp_path, store):
    spec = store.import_file(nearest_compact(tmp_path / "n.pth", scale=2), model_id="nearest")
    models = TrustedModels.prepare(store, ["nearest"])
    cached = store.path_for(spec)
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: the file still loads, as a different model
    cached.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError) as caught:
        models.load_state_dict("nearest")
    assert caught.value.expected == spec.sha256
    assert caught.value.actual == sha256_file(cached)
    assert "nearest" in str(caught.value) and str(cached) in str(caught.value)


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_prepare_refuses_a_damaged_cached_model_naming_it_and_both_hashes(tmp_path, store, damage):
    spec = store.import_file(nearest_compact(tmp_path / "n.pth", scale=2), model_id="nearest")
    cached = store.path_for(spec)
    data = bytearray(cached.read_bytes())
    if damage == "tampered":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 2 :]
    cached.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError) as caught:
        TrustedModels.prepare(store, ["nearest"])
    message = str(caught.value)
    assert "model nearest" in message and str(cached) in message
    assert f"expected {spec.sha256}, got {sha256_file(cached)}" in message


def test_the_bytes_checked_are_the_bytes_loaded(tmp_path, store, monkeypatch):
    """A file swapped after its bytes were checked cannot slip in: what deserialises is what
    was hashed, not a second read of the file."""
    weights = nearest_compact(tmp_path / "nearest.pth", scale=2)
    original = torch.load(weights, weights_only=True)["params"]
    models = TrustedModels.prepare(store, [str(weights)])
    real_read = loading.read_trusted

    def read_then_swap(path, expected, what):
        data = real_read(path, expected, what)
        nearest_compact(weights, scale=2, seed=1)  # replaced right after the check
        return data

    monkeypatch.setattr(loading, "read_trusted", read_then_swap)
    state_dict, resolved = models.load_state_dict(str(weights))
    assert resolved.sha256 == models.expected[str(weights)]
    assert original and state_dict.keys() == original.keys()
    assert all(torch.equal(state_dict[key], original[key]) for key in original)
    assert any(  # the file on disk now holds other weights
        not torch.equal(value, original[key])
        for key, value in torch.load(weights, weights_only=True)["params"].items()
    )
