"""Can the upscalers run int8? Agreement of simulated int8 inference with fp32, by how much of the
network is quantized.

    python bench/int8.py [--models x4plus,general-x4v3] [--crop 128] [--out bench/results/int8.json]

The CPU int8 kernels of ncnn and OpenVINO quantize each convolution's weights per output channel
and its input per tensor (one scale for the whole blob), symmetric, to [-127, 127]; products are
summed exactly and scaled back to float. This bench simulates exactly that in float (weights
rounded to their grid, each quantized convolution's input rounded to its grid on the way in) on
the real weights, with input scales calibrated on two old photos (bop_old_a, bop_old_b: the
99.99th percentile of |input|, or the maximum), and measures the output against fp32 on two
others (bop_old_c, Set14 baboon): PSNR after 8-bit rounding, as `auto` judges engines. Each row
quantizes a set of convolutions (all; the residual trunk; the trunk less the convolutions that
write into the residual sums) with weights and inputs, weights only, or inputs only, and gives
the share of the multiply-adds it covers: the most any int8 kernel could speed up.

A simulation, not an engine: it tells whether an int8 fast mode could keep useful agreement
before one is built. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # runnable as a script from a plain checkout

from pipeline.image import decode  # noqa: E402
from pipeline.runtimes.calibration import machine, psnr8  # noqa: E402

SHARED = REPO.parent / "shared"
WEIGHTS = {
    "x4plus": "weights/RealESRGAN_x4plus.from-ncnn.pth",
    "general-x4v3": "weights/realesr-general-x4v3.from-ncnn.pth",
}
CALIBRATION = ("old_photos/historic/bop_old_a.png", "old_photos/historic/bop_old_b.png")
TESTS = ("old_photos/historic/bop_old_c.png", "sr_benchmark/Set14/HR/baboon.png")
QMAX = 127  # symmetric int8, as ncnn and OpenVINO's CPU plugin quantize
PERCENTILE = 99.99
MODES = {"weights+inputs": (True, True), "weights": (True, False), "inputs": (False, True)}
DEFAULT_OUT = REPO / "bench/results/int8.json"


@dataclass(frozen=True)
class Row:
    model: str
    convs: str  # which convolutions are quantized
    mode: str  # weights+inputs, weights or inputs
    scale: str  # the input scale: percentile or max
    quantized: int  # convolutions quantized
    mac_share: float  # their share of the network's multiply-adds
    agreement_db: dict[str, float]  # per test crop, PSNR after 8-bit rounding against fp32

    @property
    def worst_db(self) -> float:
        return min(self.agreement_db.values())


def convolutions(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def coverages(model: nn.Module) -> dict[str, list[str]]:
    """The sets of convolutions tried, by name. An RRDBNet (x4plus): all; the trunk (the dense
    blocks); the trunk less each dense block's conv5, whose output is scaled into the residual
    sum. A compact network: all; all but the first and the last."""
    names = list(convolutions(model))
    trunk = [n for n in names if ".RDB" in n]
    if trunk:
        return {
            "all": names,
            "trunk": trunk,
            "trunk less conv5": [n for n in trunk if ".conv5" not in n],
        }
    return {"all": names, "all but first and last": names[1:-1]}


def input_ranges(model: nn.Module, images: Iterable[torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per convolution, the largest |input| and its PERCENTILE-th percentile over `images`."""
    seen: dict[str, dict[str, float]] = {}

    def record(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            flat = args[0].detach().abs().flatten().float()
            if flat.numel() > 1_000_000:  # torch.quantile's limit; a fixed subsample
                step = -(-flat.numel() // 1_000_000)
                flat = flat[::step]
            entry = seen.setdefault(name, {"max": 0.0, "percentile": 0.0})
            entry["max"] = max(entry["max"], float(flat.max()))
            entry["percentile"] = max(
                entry["percentile"], float(torch.quantile(flat, PERCENTILE / 100))
            )

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in convolutions(model).items()]
    try:
        with torch.no_grad():
            for image in images:
                model(image)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def multiply_adds(model: nn.Module, image: torch.Tensor) -> dict[str, float]:
    """Per convolution, its multiply-adds on `image`."""
    macs: dict[str, float] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Conv2d, _args: Any, out: torch.Tensor) -> None:
            kernel = module.kernel_size[0] * module.kernel_size[1]
            per_pixel = module.in_channels // module.groups * module.out_channels * kernel
            macs[name] = float(per_pixel * out.shape[-2] * out.shape[-1])

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in convolutions(model).items()]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return macs


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel, symmetric, to [-QMAX, QMAX] steps; an all-zero channel stays zero."""
    step = weight.abs().amax(dim=tuple(range(1, weight.ndim)), keepdim=True) / QMAX
    step = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round(weight / step).clamp(-QMAX, QMAX) * step


def simulate(
    model: nn.Module,
    chosen: Sequence[str],
    ranges: dict[str, dict[str, float]],
    images: dict[str, torch.Tensor],
    *,
    weights: bool,
    inputs: bool,
    scale: str = "percentile",
) -> dict[str, np.ndarray]:
    """The model's outputs on `images` with the `chosen` convolutions run as int8 would."""
    convs = convolutions(model)
    saved = {name: convs[name].weight.data.clone() for name in chosen}
    handles = []
    try:
        for name in chosen:
            conv = convs[name]
            if weights:
                conv.weight.data = quantize_weight(saved[name])
            if inputs:
                step = max(ranges[name][scale], 1e-12) / QMAX

                def round_input(_m: nn.Module, args: tuple, step: float = step) -> tuple:
                    return (torch.round(args[0] / step).clamp(-QMAX, QMAX) * step,)

                handles.append(conv.register_forward_pre_hook(round_input))
        with torch.no_grad():
            return {key: _pixels(model(image)) for key, image in images.items()}
    finally:
        for handle in handles:
            handle.remove()
        for name, weight in saved.items():
            convs[name].weight.data = weight


def study(
    name: str,
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    tests: dict[str, torch.Tensor],
    *,
    scales: Sequence[str] = ("percentile", "max"),
) -> list[Row]:
    """Every coverage x mode (x input scale, where inputs are quantized) of `model`."""
    model = model.eval()
    ranges = input_ranges(model, calibration)
    macs = multiply_adds(model, next(iter(tests.values())))
    total = sum(macs.values())
    with torch.no_grad():
        reference = {key: _pixels(model(image)) for key, image in tests.items()}
    rows = []
    for label, chosen in coverages(model).items():
        share = sum(macs[n] for n in chosen) / total
        for mode, (weights, inputs) in MODES.items():
            for scale in scales if inputs else scales[:1]:
                out = simulate(
                    model, chosen, ranges, tests, weights=weights, inputs=inputs, scale=scale
                )
                agreement = {key: psnr8(out[key], reference[key]) for key in tests}
                rows.append(
                    Row(name, label, mode, scale if inputs else "-", len(chosen), share, agreement)
                )
    return rows


def _pixels(batch: torch.Tensor) -> np.ndarray:
    return batch[0].permute(1, 2, 0).float().clamp(0, 1).numpy()


def centre_crop(path: Path, size: int) -> torch.Tensor:
    pixels = np.asarray(decode(path).pixels, dtype=np.float32)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    height, width = pixels.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    crop = np.ascontiguousarray(pixels[top : top + size, left : left + size, :3])
    return torch.from_numpy(crop).permute(2, 0, 1)[None]


def load_model(path: Path) -> nn.Module:
    import spandrel

    return spandrel.ModelLoader().load_from_file(path).model.float().eval()


def print_rows(rows: Sequence[Row]) -> None:
    print(f"{'model':<14}{'convolutions':<26}{'int8':<16}{'scale':<12}{'MACs':>6}  agreement dB")
    for row in rows:
        crops = ", ".join(f"{k} {v:.2f}" for k, v in row.agreement_db.items())
        print(
            f"{row.model:<14}{row.convs:<26}{row.mode:<16}{row.scale:<12}"
            f"{row.mac_share:>6.1%}  {crops}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(WEIGHTS))
    parser.add_argument("--crop", type=int, default=128, help="side of each centre crop, px")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(WEIGHTS))
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(WEIGHTS)}")
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: no weights or photos to measure with", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    corpus = SHARED / "corpus"
    calibration = [centre_crop(corpus / p, args.crop) for p in CALIBRATION]
    tests = {Path(p).stem: centre_crop(corpus / p, args.crop) for p in TESTS}
    started = time.perf_counter()
    rows: list[Row] = []
    for name in models:
        rows += study(name, load_model(SHARED / WEIGHTS[name]), calibration, tests)
    print_rows(rows)
    report = {
        "command": " ".join([Path(sys.executable).name, "bench/int8.py", *(argv or sys.argv[1:])]),
        "commit": _commit(),
        "machine": {**machine(), "python": platform.python_version(), "torch": torch.__version__},
        "crop": args.crop,
        "calibration": list(CALIBRATION),
        "tests": list(TESTS),
        "percentile": PERCENTILE,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": [_finite({**asdict(row), "worst_db": row.worst_db}) for row in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


def _finite(value: Any) -> Any:
    """JSON has no infinity: identical outputs (an infinite PSNR) are written as null."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return None if isinstance(value, float) and math.isinf(value) else value


def _commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
