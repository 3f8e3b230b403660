"""Write an ncnn network (.param text + .bin weights) straight from a PyTorch module, by tracing
it with torch.fx and mapping each operation to its ncnn layer.

pnnx, ncnn's own converter, needs more than 16 GB to trace Real-ESRGAN x4plus; these networks are
plain chains of convolutions, activations, residual adds, concatenations and upsampling, so a
direct writer is small. An operation it does not know raises `Unconvertible` naming it.
"""

from __future__ import annotations

import operator
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["WRITER_VERSION", "NcnnNetwork", "Unconvertible", "write_ncnn"]

WRITER_VERSION = 1  # bump when the files it writes for the same weights would change
INPUT, OUTPUT = "in0", "out0"
_MAGIC = 7767517
_RAW_FP32 = struct.pack("<I", 0)  # ncnn's weight tag: raw float32 follows
_ADD, _SUB, _MUL = 0, 1, 2


class Unconvertible(Exception):
    """The module holds an operation (or a shape of one) the writer does not translate."""


@dataclass(frozen=True)
class NcnnNetwork:
    param: bytes
    weights: bytes


@dataclass
class _Layer:
    kind: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, int | float] = field(default_factory=dict)
    weights: list[bytes] = field(default_factory=list)


def write_ncnn(module: nn.Module, in_channels: int) -> NcnnNetwork:
    """The ncnn files for `module` (fp32, on the CPU), taking `in_channels` and one output."""
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception as exc:  # tracing runs arbitrary forward code: any failure means "cannot"
        raise Unconvertible(f"cannot trace {type(module).__name__}: {exc}") from exc
    modules = dict(module.named_modules())
    layers: list[_Layer] = []
    alias: dict[str, str] = {}  # fx node -> the blob holding its value

    def blob(arg: Any) -> str:
        if not isinstance(arg, fx.Node):
            raise Unconvertible(f"expected a tensor, got {arg!r}")
        return alias[arg.name]

    for node in graph.nodes:
        if node.op == "placeholder":
            if alias:
                raise Unconvertible("more than one input")
            layers.append(_Layer("Input", "input", [], [INPUT], {0: 0, 1: 0, 2: in_channels}))
            alias[node.name] = INPUT
        elif node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node):
                raise Unconvertible("the module returns more than one tensor")
            _rename(layers, alias[result.name], OUTPUT)
        elif node.op == "call_module":
            target = modules[node.target]
            if isinstance(target, nn.Identity | nn.Dropout):
                alias[node.name] = blob(node.args[0])
                continue
            layers.append(_module_layer(target, node.name, [blob(node.args[0])]))
            alias[node.name] = node.name
        elif node.op in ("call_function", "call_method"):
            layers.append(_function_layer(node, blob))
            alias[node.name] = node.name
        else:
            raise Unconvertible(f"unsupported graph node {node.op} {node.target}")
    return _serialise(_split_shared(layers))


def _rename(layers: list[_Layer], old: str, new: str) -> None:
    for layer in layers:
        layer.tops = [new if top == old else top for top in layer.tops]
        layer.bottoms = [new if b == old else b for b in layer.bottoms]


def _floats(tensor: torch.Tensor) -> bytes:
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy(), dtype="<f4").tobytes()


def _module_layer(module: nn.Module, name: str, bottoms: list[str]) -> _Layer:
    if isinstance(module, nn.Conv2d):
        return _conv(module, name, bottoms)
    if isinstance(module, nn.LeakyReLU):
        return _Layer("ReLU", name, bottoms, [name], {0: float(module.negative_slope)})
    if isinstance(module, nn.ReLU):
        return _Layer("ReLU", name, bottoms, [name])
    if isinstance(module, nn.PReLU):
        slopes = module.weight.detach().flatten()
        return _Layer("PReLU", name, bottoms, [name], {0: slopes.numel()}, [_floats(slopes)])
    if isinstance(module, nn.PixelShuffle):
        return _Layer("PixelShuffle", name, bottoms, [name], {0: module.upscale_factor})
    if isinstance(module, nn.Upsample):
        return _nearest(name, bottoms, module.scale_factor, module.mode, module.size)
    raise Unconvertible(f"unsupported layer {type(module).__name__} ({name})")


def _conv(conv: nn.Conv2d, name: str, bottoms: list[str]) -> _Layer:
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise Unconvertible(f"unsupported convolution {name}: {conv}")
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (
        conv.kernel_size,
        conv.stride,
        conv.dilation,
        conv.padding,
    )
    params: dict[int, int | float] = {
        0: conv.out_channels,
        1: kw,
        11: kh,
        2: dw,
        12: dh,
        3: sw,
        13: sh,
        4: pw,
        14: ph,
        5: int(conv.bias is not None),
        6: conv.weight.numel(),
    }
    weights = [_RAW_FP32 + _floats(conv.weight)]
    if conv.bias is not None:
        weights.append(_floats(conv.bias))
    return _Layer("Convolution", name, bottoms, [name], params, weights)


def _nearest(name: str, bottoms: list[str], scale: Any, mode: str, size: Any) -> _Layer:
    if mode != "nearest" or size is not None or scale is None:
        raise Unconvertible(f"unsupported upsampling {name}: mode {mode}, size {size}")
    sy, sx = (scale, scale) if not isinstance(scale, tuple | list) else scale
    if float(sy) != int(sy) or float(sx) != int(sx):
        raise Unconvertible(f"unsupported upsampling {name}: non-integer scale {scale}")
    return _Layer("Interp", name, bottoms, [name], {0: 1, 1: float(sy), 2: float(sx)})


def _function_layer(node: fx.Node, blob: Any) -> _Layer:
    target, args, kwargs = node.target, node.args, node.kwargs
    name = node.name
    if target in (torch.cat, torch.concat):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if dim not in (1, -3):
            raise Unconvertible(f"concatenation along dim {dim} ({name})")
        return _Layer("Concat", name, [blob(a) for a in args[0]], [name], {0: 0})
    if target is F.interpolate:
        scale = kwargs.get("scale_factor", args[2] if len(args) > 2 else None)
        size = kwargs.get("size", args[1] if len(args) > 1 else None)
        return _nearest(name, [blob(args[0])], scale, kwargs.get("mode", "nearest"), size)
    if target is F.leaky_relu:
        slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        return _Layer("ReLU", name, [blob(args[0])], [name], {0: float(slope)})
    if target in (F.relu, torch.relu, "relu"):
        return _Layer("ReLU", name, [blob(args[0])], [name])
    if target in (F.pixel_shuffle, torch.pixel_shuffle):
        return _Layer("PixelShuffle", name, [blob(args[0])], [name], {0: int(args[1])})
    ops = {
        operator.add: _ADD,
        operator.iadd: _ADD,
        torch.add: _ADD,
        "add": _ADD,
        operator.sub: _SUB,
        operator.isub: _SUB,
        torch.sub: _SUB,
        "sub": _SUB,
        operator.mul: _MUL,
        operator.imul: _MUL,
        torch.mul: _MUL,
        "mul": _MUL,
    }
    if target in ops and len(args) == 2 and not kwargs:
        return _binary(name, ops[target], args, blob)
    raise Unconvertible(f"unsupported operation {getattr(target, '__name__', target)} ({name})")


def _binary(name: str, op: int, args: Any, blob: Any) -> _Layer:
    a, b = args
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        return _Layer("BinaryOp", name, [blob(a), blob(b)], [name], {0: op})
    if isinstance(a, fx.Node) and isinstance(b, int | float):
        return _Layer("BinaryOp", name, [blob(a)], [name], {0: op, 1: 1, 2: float(b)})
    if isinstance(b, fx.Node) and isinstance(a, int | float) and op != _SUB:
        return _Layer("BinaryOp", name, [blob(b)], [name], {0: op, 1: 1, 2: float(a)})
    raise Unconvertible(f"unsupported operands for {name}: {a!r}, {b!r}")


def _split_shared(layers: list[_Layer]) -> list[_Layer]:
    """ncnn lets one layer consume each blob: a blob read by several gets a Split layer."""
    uses = Counter(b for layer in layers for b in layer.bottoms)
    out: list[_Layer] = []
    for layer in layers:
        out.append(layer)
        for top in layer.tops:
            if uses[top] > 1:
                copies = [f"{top}_s{i}" for i in range(uses[top])]
                out.append(_Layer("Split", f"{top}_split", [top], copies))
    handed = Counter[str]()
    for layer in out:
        if layer.kind == "Split":
            continue
        for i, bottom in enumerate(layer.bottoms):
            if uses[bottom] > 1:
                layer.bottoms[i] = f"{bottom}_s{handed[bottom]}"
                handed[bottom] += 1
    return out


def _format(value: int | float) -> str:
    return f"{value:e}" if isinstance(value, float) else str(value)


def _serialise(layers: list[_Layer]) -> NcnnNetwork:
    blobs = {top for layer in layers for top in layer.tops}
    lines = [str(_MAGIC), f"{len(layers)} {len(blobs)}"]
    weights = bytearray()
    for layer in layers:
        fields = [layer.kind, layer.name, str(len(layer.bottoms)), str(len(layer.tops))]
        fields += layer.bottoms + layer.tops
        fields += [f"{key}={_format(value)}" for key, value in layer.params.items()]
        lines.append(" ".join(fields))
        for chunk in layer.weights:
            weights += chunk
    return NcnnNetwork(param=("\n".join(lines) + "\n").encode("ascii"), weights=bytes(weights))
