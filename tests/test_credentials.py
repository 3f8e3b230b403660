"""C2PA content credentials: with a certificate chain the test makes (a root and an ES256 signing
certificate, built with cryptography), `scanrestore process` signs each output; c2pa-python's
reader verifies it and lists the scan as parent and each stage's action; one altered byte
breaks it; an output C2PA cannot sign is published unsigned with the reason in its XMP."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import c2pa
import pytest
from c2pakeys import make_keys, pem_private_key
from conftest import shared_file
from cryptography.hazmat.primitives.asymmetric import ec
from modelfactory import tiny_compact

from daemon.cli import main
from pipeline.credentials import read_manifest
from pipeline.image import decode
from pipeline.sourcetype import ALGORITHMICALLY_ENHANCED, COMPOSITE_WITH_TRAINED

PHOTO = "corpus/sr_benchmark/Set5/LR_bicubic_X4/babyx4.png"


@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    """A root CA and an ES256 signer it certified (tests/c2pakeys.py)."""
    return make_keys(tmp_path / "keys")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("SCANRESTORE_CACHE_DIR", str(path))
    return path


def _config(tmp_path: Path, keys: dict[str, Path]) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[provenance]\nc2pa_cert = "{keys["chain"]}"\nc2pa_key = "{keys["key"]}"\n'
        '[[pipeline.stages]]\nkind = "denoise"\n[[pipeline.stages]]\nkind = "upscale"\n'
    )
    return config


def _process(capsys, config: Path, *argv: str) -> dict:
    code = main(["--config", str(config), "process", *argv, "--json"])
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, record
    return record


def _signed(tmp_path, capsys, cache, keys) -> tuple[Path, dict]:
    photo = shared_file(PHOTO)
    model = tiny_compact(tmp_path / "tiny-x2.pth", scale=2)
    out = tmp_path / "out"
    argv = [str(photo), "--out", str(out), "--model", str(model), "--scale", "2"]
    record = _process(capsys, _config(tmp_path, keys), *argv)
    return Path(record["output"]), record


def test_a_signed_output_verifies_and_its_manifest_lists_the_stages(tmp_path, capsys, cache, keys):
    output, record = _signed(tmp_path, capsys, cache, keys)
    assert record["credentials"] == "c2pa"
    reader = read_manifest(output, "png", trust_anchors=keys["root"].read_bytes())
    assert reader.get_validation_state() == "Trusted", reader.get_validation_results()
    manifest = reader.get_active_manifest()
    (actions,) = [a["data"]["actions"] for a in manifest["assertions"] if "actions" in a["label"]]
    assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.filtered", "c2pa.resized"]
    assert actions[1]["digitalSourceType"] == ALGORITHMICALLY_ENHANCED  # non-local means
    assert actions[2]["digitalSourceType"] == COMPOSITE_WITH_TRAINED
    sha = record["stages"][1]["params"]["model_sha256"]
    assert actions[2]["softwareAgent"] == {"name": "file:tiny-x2.pth", "version": f"sha256:{sha}"}
    (ingredient,) = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf"
    assert ingredient["title"] == "babyx4.png"
    image = decode(output)  # still an image, with the provenance stamp
    assert b"<scanrestore:ContentCredentials>c2pa<" in image.metadata.xmp
    assert COMPOSITE_WITH_TRAINED.encode() in image.metadata.xmp


def _idat_offset(data: bytes) -> int:
    """The first byte of the first IDAT chunk's pixel data."""
    position = 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IDAT":
            return position + 8 + length // 2
        position += 12 + length
    raise AssertionError("no IDAT chunk")


def test_altering_one_byte_of_a_signed_output_fails_verification(tmp_path, capsys, cache, keys):
    output, _ = _signed(tmp_path, capsys, cache, keys)
    data = bytearray(output.read_bytes())
    data[_idat_offset(data)] ^= 0x01
    altered = tmp_path / "altered.png"
    altered.write_bytes(bytes(data))
    reader = read_manifest(altered, "png", trust_anchors=keys["root"].read_bytes())
    assert reader.get_validation_state() == "Invalid"
    failures = [f["code"] for f in reader.get_validation_results()["activeManifest"]["failure"]]
    assert "assertion.dataHash.mismatch" in failures


def test_an_output_c2pa_cannot_sign_is_published_unsigned_with_its_reason(
    tmp_path, capsys, cache, keys, monkeypatch
):
    """Every format scanrestore writes is one this c2pa build signs, so a build without WebP
    is simulated by taking WebP out of the list the library reports."""
    supported = [m for m in c2pa.Builder.get_supported_mime_types() if "webp" not in m]
    monkeypatch.setattr(c2pa.Builder, "get_supported_mime_types", classmethod(lambda _: supported))
    photo = shared_file(PHOTO)
    model = tiny_compact(tmp_path / "tiny-x2.pth", scale=2)
    out = tmp_path / "out"
    argv = [str(photo), "--out", str(out), "--model", str(model), "--format", "webp"]
    record = _process(capsys, _config(tmp_path, keys), *argv)
    assert record["credentials"] == "unsigned: C2PA cannot sign webp files"
    output = Path(record["output"])
    assert output.name == "babyx4.v1.webp"
    image = decode(output)
    assert b"<scanrestore:ContentCredentials>unsigned: C2PA cannot sign webp files<" in (
        image.metadata.xmp
    )
    with pytest.raises(c2pa.C2paError):  # no manifest in it
        read_manifest(output, "webp").get_active_manifest()


def test_a_key_that_does_not_match_the_certificate_stops_before_any_image(
    tmp_path, capsys, cache, keys
):
    keys["key"].write_bytes(pem_private_key(ec.generate_private_key(ec.SECP256R1())))
    out = tmp_path / "out"
    code = main(["--config", str(_config(tmp_path, keys)), "process", "x.png", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "provenance.c2pa_cert/c2pa_key" in err and str(keys["chain"]) in err
