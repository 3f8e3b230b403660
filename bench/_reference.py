"""Upstream Real-ESRGAN's `RealESRGANer`, fetched at bench time and never committed here.

The `realesrgan` package fails to import with current torchvision and pulls in basicsr, so the
benchmark downloads its pinned wheel, checks the hash, and imports only `realesrgan/utils.py`
(which needs nothing from torchvision) with a stub for the one basicsr helper it imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import subprocess
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import spandrel
import torch

__all__ = ["PRE_PAD", "TILE_PAD", "Upstream", "UpstreamUnavailable", "enhance", "fetch_upstream"]

REQUIREMENT = "realesrgan==0.3.0"
WHEEL = "realesrgan-0.3.0-py3-none-any.whl"
WHEEL_SHA256 = "59336c16c30dd5130eff350dd27424acb9b7281d18a6810130e265606c9a6088"
# Upstream's defaults (RealESRGANer and inference_realesrgan.py): context around each tile and
# reflection padding on the bottom/right of the whole image.
TILE_PAD = 10
PRE_PAD = 10


class UpstreamUnavailable(RuntimeError):
    """The upstream reference could not be fetched or imported; the message says why."""


@dataclass(frozen=True)
class Upstream:
    """The upstream class and a sentence saying how it was obtained, for the report."""

    realesrganer: type
    route: str

    def upsampler(self, weights: Path, tile: int, workdir: Path) -> Any:
        """A RealESRGANer built as upstream's inference script builds one: fp32, NCHW, its own
        freshly constructed network, weights loaded by its own code (`torch.load` then
        `load_state_dict(params_ema)`). spandrel names RRDBNet's layers differently from
        upstream, so the same tensors are re-saved under spandrel's names first."""
        state = torch.load(weights, map_location="cpu", weights_only=True)
        params = state.get("params_ema", state.get("params"))
        descriptor = spandrel.ModelLoader().load_from_state_dict(params)
        model = descriptor.model
        renamed = workdir / f"{weights.stem}.spandrel-names.pth"
        if not renamed.exists():
            torch.save({"params_ema": model.state_dict()}, renamed)
        return self.realesrganer(
            scale=descriptor.scale,
            model_path=str(renamed),
            model=model,
            tile=tile,
            tile_pad=TILE_PAD,
            pre_pad=PRE_PAD,
            half=False,
            device=torch.device("cpu"),
        )


def enhance(upsampler: Any, bgr: np.ndarray) -> np.ndarray:
    """Upstream's own entry point on an 8-bit BGR image; returns 8-bit BGR at the model's scale."""
    with contextlib.redirect_stdout(io.StringIO()):  # upstream prints one line per tile
        output, _ = upsampler.enhance(bgr, outscale=upsampler.scale)
    return output


def fetch_upstream(workdir: Path) -> Upstream:
    """Download the pinned wheel into `workdir` and import RealESRGANer from it."""
    wheel = _download(workdir)
    with zipfile.ZipFile(wheel) as archive:
        source = workdir / "realesrgan_utils.py"
        source.write_bytes(archive.read("realesrgan/utils.py"))
    module = _import_with_stubs(source)
    return Upstream(
        realesrganer=module.RealESRGANer,
        route=f"pip download {REQUIREMENT} (sha256 {WHEEL_SHA256[:16]}...), "
        "RealESRGANer.enhance from its realesrgan/utils.py, imported with a basicsr stub",
    )


def _download(workdir: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        REQUIREMENT,
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(workdir),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UpstreamUnavailable(f"pip download {REQUIREMENT}: {exc}") from exc
    wheel = workdir / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UpstreamUnavailable(f"pip download {REQUIREMENT} failed: {tail}")
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if actual != WHEEL_SHA256:
        raise UpstreamUnavailable(f"{wheel}: sha256 {actual}, expected {WHEEL_SHA256}")
    return wheel


def _import_with_stubs(source: Path) -> types.ModuleType:
    """Import `source` with basicsr stubbed (only if it is not installed), then unregister the
    stubs so nothing else in this process sees a fake basicsr."""
    stubs = {} if importlib.util.find_spec("basicsr") else _basicsr_stubs()
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("realesrgan_upstream_utils", source)
        if spec is None or spec.loader is None:
            raise UpstreamUnavailable(f"{source}: not importable")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except UpstreamUnavailable:
        raise
    except Exception as exc:
        raise UpstreamUnavailable(f"importing upstream {source.name}: {exc!r}") from exc
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return module


def _basicsr_stubs() -> dict[str, types.ModuleType]:
    def load_file_from_url(url: str, **_: Any) -> str:
        raise UpstreamUnavailable(f"the benchmark passes local weights; refusing to fetch {url}")

    names = ("basicsr", "basicsr.utils", "basicsr.utils.download_util")
    stubs = {name: types.ModuleType(name) for name in names}
    stubs["basicsr.utils.download_util"].load_file_from_url = load_file_from_url  # type: ignore[attr-defined]
    return stubs
