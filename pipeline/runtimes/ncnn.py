"""The ncnn engine: a spandrel model written as an ncnn network (pipeline.runtimes.ncnn_writer)
and run on the CPU in fp32 with Winograd and sgemm convolutions, tile by tile; an upsampling
tail (pipeline.runtimes.ncnn_tail) runs band by band over the body's output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from spandrel.__helpers.size_req import pad_tensor

from pipeline.errors import StageError
from pipeline.runtimes.converted import ConvertedModel, called_plainly, converted_model
from pipeline.runtimes.ncnn_tail import Tail, find_tail
from pipeline.runtimes.ncnn_writer import INPUT, OUTPUT, WRITER_VERSION, Unconvertible, write_ncnn

__all__ = ["BAND_PIXELS", "RUNTIME_REVISION", "NcnnEngine", "convert_ncnn", "ncnn_version"]

# Body pixels per band of the tail. x4plus on a 320 px tile (256 + overlap 64), one thread:
# whole, the first call peaked 4695 MB over the loaded net; in bands of 8192 or 4096 px, 1441 and
# 1435 MB (the body's own peak), same output bits. Larger bands waste less on the 3-row halo.
BAND_PIXELS = 16384
# Bumped when the way this engine runs a converted net changes its speed or memory, so `auto`
# measures again instead of trusting a decision taken on the old behaviour.
RUNTIME_REVISION = 2


def ncnn_version() -> str:
    import ncnn

    return str(ncnn.__version__)


def convert_ncnn(descriptor: Any, weights_sha256: str, cache_dir: Path) -> ConvertedModel:
    """The model's ncnn files, cached by weights hash and writer/ncnn versions (ncnn's input
    shape is dynamic, so one conversion serves every tile). Raises Unconvertible."""
    if not called_plainly(descriptor):
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


class NcnnEngine:
    """Duck-types pipeline.tiling.Engine for run_tiled: `infer` on NCHW float32 batches."""

    name = "ncnn"
    compiled = False

    def __init__(
        self,
        descriptor: Any,
        converted: ConvertedModel,
        *,
        threads: int,
        vulkan_device: int | None = None,
    ) -> None:
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
        # On a Vulkan GPU too: fp32 storage and arithmetic (GPUs default to fp16).
        opt.use_vulkan_compute = vulkan_device is not None
        self.vulkan_device = vulkan_device
        self.gpu = None
        if vulkan_device is not None:
            self._net.set_vulkan_device(vulkan_device)
            self.gpu = str(ncnn.get_gpu_info(vulkan_device).device_name())
        # From the files just verified: the bindings' in-memory loader copies the bytes into a
        # temporary that ncnn would keep pointing into after the call returns.
        folder = converted.folder
        if self._net.load_param(str(folder / "model.param")) != 0:
            raise StageError(f"ncnn: cannot load {folder / 'model.param'}")
        self._net.load_model(str(folder / "model.bin"))
        self.tail: Tail | None = find_tail((folder / "model.param").read_text("ascii"), OUTPUT)

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        height, width = batch.shape[-2:]
        _, x = pad_tensor(batch, self.descriptor.size_requirements)
        outputs = []
        for image in x.float().numpy():
            pixels = np.ascontiguousarray(image)
            if self.tail is None or pixels.shape[1] * pixels.shape[2] <= BAND_PIXELS:
                outputs.append(self._extract(INPUT, pixels, OUTPUT))
            else:
                body = self._extract(INPUT, pixels, self.tail.blob).numpy()
                outputs.append(self._banded_tail(self.tail, body))
        y = torch.stack(outputs)[..., : height * self.scale, : width * self.scale]
        return y.clamp_(0, 1)

    def _extract(self, name: str, pixels: np.ndarray, blob: str) -> torch.Tensor:
        import ncnn

        extractor = self._net.create_extractor()
        extractor.input(name, ncnn.Mat(pixels))  # `pixels` outlives the Mat borrowing it
        status, out = extractor.extract(blob)
        if status != 0:
            raise StageError(f"ncnn: inference failed at {blob} with status {status}")
        return torch.from_numpy(np.array(out))

    def _banded_tail(self, tail: Tail, body: np.ndarray) -> torch.Tensor:
        """The tail over horizontal bands of the body's output, each read with `halo` rows of
        its neighbours and cropped back: the same result as one call, a fraction of the peak."""
        _, height, width = body.shape
        rows = max(2 * tail.halo, BAND_PIXELS // width)
        s = tail.scale
        parts = []
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            lo, hi = max(0, top - tail.halo), min(height, bottom + tail.halo)
            band = np.ascontiguousarray(body[:, lo:hi])
            out = self._extract(tail.blob, band, OUTPUT)
            parts.append(out[:, (top - lo) * s : (bottom - lo) * s])
        return torch.cat(parts, dim=1)
