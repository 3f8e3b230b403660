"""The ncnn engine: a spandrel model written as an ncnn network (pipeline.runtimes.ncnn_writer)
and run on the CPU in fp32 with Winograd and sgemm convolutions, tile by tile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from spandrel.__helpers.size_req import pad_tensor

from pipeline.errors import StageError
from pipeline.runtimes.converted import ConvertedModel, converted_model
from pipeline.runtimes.ncnn_writer import INPUT, OUTPUT, WRITER_VERSION, Unconvertible, write_ncnn

__all__ = ["NcnnEngine", "convert_ncnn", "ncnn_version"]


def ncnn_version() -> str:
    import ncnn

    return str(ncnn.__version__)


def convert_ncnn(descriptor: Any, weights_sha256: str, cache_dir: Path) -> ConvertedModel:
    """The model's ncnn files, cached by weights hash and writer/ncnn versions (ncnn's input
    shape is dynamic, so one conversion serves every tile). Raises Unconvertible."""
    if not _called_plainly(descriptor):
        raise Unconvertible(f"{descriptor.architecture.id} is not called as image -> image")
    key = {
        "engine": "ncnn",
        "weights_sha256": weights_sha256,
        "writer": WRITER_VERSION,
        "ncnn": ncnn_version(),
        "input": "dynamic",
    }

    def convert() -> dict[str, bytes]:
        network = write_ncnn(descriptor.model, int(descriptor.input_channels))
        return {"model.param": network.param, "model.bin": network.weights}

    return converted_model(cache_dir, key, convert)


def _called_plainly(descriptor: Any) -> bool:
    """True when spandrel calls the model as model(image) (its default), not with extra inputs
    or outputs (FBCNN's quality estimate, FDnCNN's noise map)."""
    call = getattr(descriptor, "_call_fn", None)
    return call is None or "ModelDescriptor.__init__" in getattr(call, "__qualname__", "")


class NcnnEngine:
    """Duck-types pipeline.tiling.Engine for run_tiled: `infer` on NCHW float32 batches."""

    name = "ncnn"
    compiled = False

    def __init__(self, descriptor: Any, converted: ConvertedModel, *, threads: int) -> None:
        import ncnn

        self.descriptor = descriptor
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.scale = int(descriptor.scale)
        self.in_channels = int(descriptor.input_channels)
        self.version = ncnn_version()
        self.converted = converted
        self.threads = threads
        self._net = ncnn.Net()
        opt = self._net.opt
        opt.num_threads = threads
        # Exact mode: fp32 storage and arithmetic (ncnn's defaults store fp16 on ARM).
        opt.use_fp16_storage = opt.use_fp16_packed = opt.use_fp16_arithmetic = False
        opt.use_bf16_storage = False
        opt.use_winograd_convolution = opt.use_sgemm_convolution = True
        opt.use_vulkan_compute = False
        # From the files just verified: the bindings' in-memory loader copies the bytes into a
        # temporary that ncnn would keep pointing into after the call returns.
        folder = converted.folder
        if self._net.load_param(str(folder / "model.param")) != 0:
            raise StageError(f"ncnn: cannot load {folder / 'model.param'}")
        self._net.load_model(str(folder / "model.bin"))

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        height, width = batch.shape[-2:]
        _, x = pad_tensor(batch, self.descriptor.size_requirements)
        outputs = []
        for image in x.float().numpy():
            import ncnn

            pixels = np.ascontiguousarray(image)  # kept alive: the Mat borrows its memory
            extractor = self._net.create_extractor()
            extractor.input(INPUT, ncnn.Mat(pixels))
            status, out = extractor.extract(OUTPUT)
            if status != 0:
                raise StageError(f"ncnn: inference failed with status {status}")
            outputs.append(torch.from_numpy(np.array(out)))
        y = torch.stack(outputs)[..., : height * self.scale, : width * self.scale]
        return y.clamp_(0, 1)
