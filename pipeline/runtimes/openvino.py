"""The OpenVINO engine: a spandrel model traced with TorchScript, converted by OpenVINO's PyTorch
frontend, kept in the model cache with fp32 weights, and compiled on the CPU for each tile shape
at a fixed inference precision (f32 in exact mode)."""

from __future__ import annotations

import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from spandrel.__helpers.size_req import pad_tensor

from pipeline.errors import StageError
from pipeline.runtimes.converted import ConvertedModel, called_plainly, converted_model
from pipeline.runtimes.ncnn_writer import Unconvertible

__all__ = ["OpenVinoEngine", "convert_openvino", "import_openvino", "openvino_version"]

# Bumped when the conversion below changes what it writes.
CONVERTER_VERSION = 1
_TRACE_SIDE = 32  # the example input traced; the saved model takes any height and width
_SHAPES_KEPT = 2  # compiled shapes held at once: the tiles' and one edge or calibration shape
_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def import_openvino() -> Any:
    """`import openvino` with its telemetry off: the wheel's converter sends an event on import
    through `openvino_telemetry` unless that import fails, when it falls back to its bundled
    no-op stub (README: Engines)."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino

    return openvino


def openvino_version() -> str:
    return str(import_openvino().__version__)


def convert_openvino(descriptor: Any, weights_sha256: str, cache_dir: Path) -> ConvertedModel:
    """The model as OpenVINO IR (model.xml, model.bin with fp32 weights), cached by weights hash
    and converter, OpenVINO and torch versions; its height and width stay dynamic, so one
    conversion serves every tile. Raises Unconvertible."""
    if not called_plainly(descriptor):
        raise Unconvertible(f"{descriptor.architecture.id} is not called as image -> image")
    ov = import_openvino()
    key = {
        "engine": "openvino",
        "weights_sha256": weights_sha256,
        "converter": CONVERTER_VERSION,
        "openvino": openvino_version(),
        "torch": torch.__version__,
        "input": "dynamic",
    }

    def convert() -> dict[str, bytes]:
        channels = int(descriptor.input_channels)
        _, example = pad_tensor(
            torch.rand(1, channels, _TRACE_SIDE, _TRACE_SIDE), descriptor.size_requirements
        )
        # Traced here without the checking re-run (x4plus: 20 s with the conversion, against
        # 79 s through convert_model's own tracing), on a small input: the trace does not
        # depend on it.
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # TorchScript tracing is deprecated upstream and warns about branches on
                # shapes; the input is already padded to the model's size multiple, so a
                # traced branch is the one every tile takes.
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(descriptor.model, example, check_trace=False)
                model = ov.convert_model(traced, example_input=example)
        except Exception as exc:  # the frontend raises many kinds for an unsupported operation
            arch = descriptor.architecture.id
            raise Unconvertible(f"OpenVINO cannot convert {arch}: {exc}") from exc
        model.reshape([1, channels, -1, -1])
        with tempfile.TemporaryDirectory(prefix="scanrestore-openvino-") as tmp:
            xml = Path(tmp) / "model.xml"
            # The default halves the weights to fp16: exact mode keeps them fp32.
            ov.save_model(model, str(xml), compress_to_fp16=False)
            return {
                "model.xml": xml.read_bytes(),
                "model.bin": xml.with_suffix(".bin").read_bytes(),
            }

    return converted_model(cache_dir, key, convert)


class OpenVinoEngine:
    """Duck-types pipeline.tiling.Engine for run_tiled: `infer` on NCHW float32 batches. The
    network is compiled for each input shape it meets (OpenVINO runs a fixed shape faster than a
    dynamic one; run_tiled's tiles share one shape)."""

    name = "openvino"
    compiled = False

    def __init__(
        self, descriptor: Any, converted: ConvertedModel, *, threads: int, precision: str = "fp32"
    ) -> None:
        if precision not in _PRECISIONS:
            raise StageError(f"openvino: precision {precision!r} must be fp32 or bf16")
        ov = import_openvino()
        self.descriptor = descriptor
        self.device = torch.device("cpu")
        self.precision = precision
        self.scale = int(descriptor.scale)
        self.in_channels = int(descriptor.input_channels)
        self.version = openvino_version()
        self.converted = converted
        self.threads = threads
        self._core = ov.Core()
        # From the bytes just verified against the manifest, not from the files again.
        self._model = self._core.read_model(
            converted.files["model.xml"], converted.files["model.bin"]
        )
        self._config = {
            "INFERENCE_PRECISION_HINT": _PRECISIONS[precision],
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # Pinning (on by default on Linux) ties each process's threads to the first cores:
            # two one-thread workers then share one core (bench/split.py: 2x1 at half of 1x2).
            "ENABLE_CPU_PINNING": False,
        }
        self._compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def _request(self, shape: tuple[int, ...]) -> Any:
        if shape in self._compiled:
            self._compiled.move_to_end(shape)
            return self._compiled[shape]
        while len(self._compiled) >= _SHAPES_KEPT:
            self._compiled.popitem(last=False)
        model = self._model.clone()
        model.reshape(list(shape))
        compiled = self._core.compile_model(model, "CPU", self._config)
        request = self._compiled[shape] = compiled.create_infer_request()
        return request

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        height, width = batch.shape[-2:]
        _, x = pad_tensor(batch, self.descriptor.size_requirements)
        pixels = np.ascontiguousarray(x.float().numpy())
        request = self._request(tuple(pixels.shape))
        try:
            out = request.infer({0: pixels})[0]
        except RuntimeError as exc:
            raise StageError(f"openvino: inference failed: {exc}") from exc
        y = torch.from_numpy(np.array(out, dtype=np.float32))
        return y[..., : height * self.scale, : width * self.scale].clamp_(0, 1)
