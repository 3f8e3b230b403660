"""DefectUNet: a small fully convolutional U-Net giving, for each pixel of a scan, the
probability that it is dust, a scratch, a fibre or a crack; wrapped as a spandrel architecture
so it runs tiled through the same engine as every other model. A luma network (recipes v1-v4)
reads one channel; a colour network (recipe v5 on) reads RGB, the luma evidence plus chroma."""

from __future__ import annotations

from typing import Any

import spandrel
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "CHROMA_FEATURES",
    "DEFECT_ARCH",
    "FEATURES",
    "DefectUNet",
    "chroma_features",
    "defect_descriptor",
    "features",
]

_MARKER = "defectunet.head.weight"  # a key no other architecture has


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


# Sides of the square grey openings and closings whose residues are input features: a speck
# or a scratch narrower than the side is what the opening (closing) removes. The widest side
# sits past the widest defect (a 6.5 px speck, an 8 px scratch): a patch that only it removes
# is too wide to be dust, the evidence that keeps wing cells and highlights out.
_MORPH_SIDES = (5, 11, 19)
FEATURES = 2 + 2 * len(_MORPH_SIDES)
# A colour network's extra planes (chroma_features).
CHROMA_FEATURES = 4
_LUMA = (0.299, 0.587, 0.114)


def _max(x: torch.Tensor, side: int) -> torch.Tensor:
    """The maximum over the square window `side` wide around each pixel (edges replicated), as
    a row pass and a column pass: the same values as one square pass, several times faster."""
    half = side // 2
    rows = F.max_pool2d(F.pad(x, (half, half, 0, 0), mode="replicate"), (1, side), stride=1)
    return F.max_pool2d(F.pad(rows, (0, 0, half, half), mode="replicate"), (side, 1), stride=1)


def _local_mean(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (7, 7, 7, 7), mode="replicate"), 15, stride=1)


def features(x: torch.Tensor) -> torch.Tensor:
    """The luma centred by its local mean and by mid-grey (so that exposure and tone do not
    matter), and the white and black top-hats at each side in _MORPH_SIDES: the classic dust
    evidence (what sticks out brighter or darker than its surroundings), given to the network
    so that its few parameters go to telling damage from highlights and texture."""
    planes = [x - _local_mean(x), x - 0.5]
    for side in _MORPH_SIDES:
        opened = _max(-_max(-x, side), side)
        closed = -_max(-_max(x, side), side)
        planes += [x - opened, closed - x]
    return torch.cat(planes, dim=1)


def chroma_features(rgb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The colour differences R - Y and B - Y (how saturated the place is, zero on a grey
    scan) and their departures from the local mean. Dust, a scratch through the emulsion or a
    hair is near neutral, so it pulls a coloured place's chroma toward grey; a highlight, a
    wing cell or a coloured line keeps its surroundings' hue or has its own."""
    chroma = torch.cat([rgb[:, 0:1] - y, rgb[:, 2:3] - y], dim=1)
    return torch.cat([chroma, chroma - _local_mean(chroma)], dim=1)


class DefectUNet(nn.Module):
    """Four levels (widths w, 2w, 4w, 6w), max-pool down, bilinear up with skips; input
    (N, 1, H, W) luma, or (N, 3, H, W) RGB for a colour network, in 0..1 with H and W
    multiples of 8; output (N, 1, H, W) probabilities. The network sees `features` of the
    luma (and a colour network `chroma_features`), not the pixels themselves."""

    def __init__(self, width: int = 16, colour: bool = False) -> None:
        super().__init__()
        w = width
        self.width = width
        self.colour = colour
        first = FEATURES + (CHROMA_FEATURES if colour else 0)
        self.enc = nn.ModuleList([_block(first, w), _block(w, 2 * w), _block(2 * w, 4 * w)])
        self.mid = _block(4 * w, 6 * w)
        self.dec = nn.ModuleList(
            [_block(6 * w + 4 * w, 4 * w), _block(4 * w + 2 * w, 2 * w), _block(2 * w + w, w)]
        )
        self.defectunet = nn.Module()
        self.defectunet.head = nn.Conv2d(w, 1, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.colour:
            y = x[:, 0:1] * _LUMA[0] + x[:, 1:2] * _LUMA[1] + x[:, 2:3] * _LUMA[2]
            h = torch.cat([features(y), chroma_features(x, y)], dim=1)
        else:
            h = features(x)
        skips = []
        for block in self.enc:
            h = block(h)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.mid(h)
        for block, skip in zip(self.dec, reversed(skips), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return self.defectunet.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class _DefectArch(spandrel.Architecture[DefectUNet]):
    def __init__(self) -> None:
        super().__init__(id="DefectUNet", detect=lambda state: _MARKER in state)

    def load(self, state_dict: spandrel.StateDict) -> spandrel.ImageModelDescriptor[DefectUNet]:
        width, first = (int(n) for n in state_dict["enc.0.0.weight"].shape[:2])
        if first not in (FEATURES, FEATURES + CHROMA_FEATURES):
            raise ValueError(f"a first layer of {first} inputs is neither luma nor colour")
        colour = first == FEATURES + CHROMA_FEATURES
        model = DefectUNet(width, colour)
        model.load_state_dict(state_dict)
        model.eval()
        return spandrel.ImageModelDescriptor(
            model,
            state_dict,
            architecture=self,
            purpose="Restoration",
            tags=[f"{width}w", "colour" if colour else "luma"],
            supports_half=True,
            supports_bfloat16=True,
            scale=1,
            input_channels=3 if colour else 1,
            output_channels=1,
            size_requirements=spandrel.SizeRequirements(minimum=16, multiple_of=8),
        )


DEFECT_ARCH = _DefectArch()


def defect_descriptor(state_dict: dict[str, Any]) -> spandrel.ImageModelDescriptor[DefectUNet]:
    """The descriptor of a DefectUNet state dict (already loaded safely), or ValueError."""
    if not DEFECT_ARCH.detect(state_dict):
        raise ValueError("not a DefectUNet state dict")
    return DEFECT_ARCH.load(state_dict)
