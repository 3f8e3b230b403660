"""Where an ncnn network's upsampling tail starts and how far its convolutions reach, so the
tail can run band by band: Real-ESRGAN x4plus spends most of its memory there (64-channel maps
at 4x the tile, with Winograd workspaces), while its compute is in the body at 1x."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Tail", "find_tail"]

# Layers a tail may hold: pointwise ones and stride-1 convolutions (whose reach is counted) and
# nearest upsampling (which moves nothing across rows). Anything else keeps the net whole.
_POINTWISE = {"ReLU", "PReLU", "BinaryOp", "Split", "Concat", "Sigmoid", "Clip"}


@dataclass(frozen=True)
class Tail:
    """The tail reads only `blob` (at the body's resolution), multiplies it by `scale`, and an
    output row depends on body rows at most `halo` away (rounded up, plus one for safety)."""

    blob: str
    scale: int
    halo: int


@dataclass(frozen=True)
class _Layer:
    kind: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    params: dict[int, str]


def _parse(param: str) -> list[_Layer]:
    layers = []
    for line in param.splitlines()[2:]:
        fields = line.split()
        if not fields:
            continue
        nb, nt = int(fields[2]), int(fields[3])
        blobs = fields[4 : 4 + nb + nt]
        params = {}
        for item in fields[4 + nb + nt :]:
            key, _, value = item.partition("=")
            params[int(key)] = value
        layers.append(_Layer(fields[0], tuple(blobs[:nb]), tuple(blobs[nb:]), params))
    return layers


def find_tail(param: str, output: str) -> Tail | None:
    """The tail from the input of the first upsampling layer to `output`, or None when there
    is none or it reads anything but that one blob (Compact adds the upsampled input image)."""
    layers = _parse(param)
    first = next((i for i, layer in enumerate(layers) if layer.kind == "Interp"), None)
    if first is None:
        return None
    cut = layers[first].bottoms[0]
    start = next(i for i, layer in enumerate(layers) if cut in layer.tops) + 1
    scale_of = {cut: 1}
    reach = 0.0
    for layer in layers[start:]:
        if any(b not in scale_of for b in layer.bottoms):
            return None  # reads a blob from before the cut
        scale = max(scale_of[b] for b in layer.bottoms)
        if layer.kind == "Interp":
            sy, sx = float(layer.params.get(1, "1")), float(layer.params.get(2, "1"))
            if layer.params.get(0) != "1" or sy != sx or sy != int(sy):
                return None
            scale *= int(sy)
        elif layer.kind == "Convolution":
            k = int(layer.params.get(11, layer.params.get(1, "1")))
            dilation = int(layer.params.get(12, layer.params.get(2, "1")))
            if int(layer.params.get(13, layer.params.get(3, "1"))) != 1:
                return None
            reach += dilation * (k // 2) / scale
        elif layer.kind not in _POINTWISE:
            return None
        for top in layer.tops:
            scale_of[top] = scale
    if output not in scale_of or scale_of[output] == 1:
        return None
    return Tail(blob=cut, scale=scale_of[output], halo=math.ceil(reach) + 1)
