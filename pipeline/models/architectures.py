"""Architecture detection and building: what a state dict holds (spandrel, facexlib's RetinaFace and
ParseNet, KAIR's FFDNet) and the network built from it on a device."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import ArchitectureMismatchError, ModelError
from pipeline.models.loading import unwrap, unwrap_state_dict
from pipeline.models.spec import Loader, ModelSpec, Purpose

if TYPE_CHECKING:
    import torch
    from spandrel import ImageModelDescriptor

__all__ = ["Detected", "build_from_state_dict", "check_descriptor", "detect", "spandrel_descriptor"]

_SPANDREL_PURPOSES: Mapping[str, Purpose] = {
    "SR": "upscale",
    "FaceSR": "face",
    "Restoration": "denoise",
    "Inpainting": "inpaint",
}


@dataclass(frozen=True)
class Detected:
    architecture: str
    scale: int
    purpose: Purpose
    loader: Loader
    variant: str | None = None


_RETINAFACE_HEADS = (
    "ClassHead.0.conv1x1.weight",
    "BboxHead.0.conv1x1.weight",
    "LandmarkHead.0.conv1x1.weight",
)
_RETINAFACE_BACKBONES = {"body.stage1.0.0.weight": "mobile0.25", "body.conv1.weight": "resnet50"}
_PARSENET_KEYS = (
    "encoder.0.conv2d.weight",
    "out_img_conv.conv2d.weight",
    "out_mask_conv.conv2d.weight",
)


def _detect_facexlib(state_dict: Mapping[str, Any]) -> Detected | None:
    if all(key in state_dict for key in _RETINAFACE_HEADS):
        for key, variant in _RETINAFACE_BACKBONES.items():
            if key in state_dict:
                return Detected("RetinaFace", 1, "detect", "state_dict", variant)
    if all(key in state_dict for key in _PARSENET_KEYS):
        return Detected("ParseNet", 1, "parse", "state_dict")
    return None


def _detect_ffdnet(state_dict: Mapping[str, Any]) -> Detected | None:
    """KAIR's FFDNet, which spandrel mistakes for a 12-channel FDnCNN.

    FFDNet works on 2x2 pixel-unshuffled input plus a noise-level map: its first conv takes
    4*C + 1 channels and its last gives 4*C, C being 1 (grey) or 3 (colour).
    """
    weights = [key for key in state_dict if re.fullmatch(r"model\.\d+\.weight", key)]
    if not weights or any("running_mean" in key for key in state_dict):
        return None
    ordered = sorted(weights, key=lambda key: int(key.split(".")[1]))
    first, last = state_dict[ordered[0]], state_dict[ordered[-1]]
    if getattr(first, "ndim", None) != 4 or getattr(last, "ndim", None) != 4:
        return None
    channels = {4: "gray", 12: "color"}.get(last.shape[0])
    if channels is None or first.shape[1] != last.shape[0] + 1:
        return None
    return Detected("FFDNet", 1, "denoise", "state_dict", channels)


def _build_retinaface(
    variant: str | None, state_dict: Mapping[str, Any], device: torch.device
) -> torch.nn.Module:
    from facexlib.detection.retinaface import RetinaFace

    if variant not in ("resnet50", "mobile0.25"):
        raise ModelError(
            f"RetinaFace needs a backbone variant (resnet50 or mobile0.25), got {variant!r}"
        )
    with warnings.catch_warnings():
        # facexlib still passes torchvision's deprecated `pretrained=False`; nothing is downloaded.
        warnings.simplefilter("ignore", UserWarning)
        network = RetinaFace(network_name=variant, half=False, device=device)
    network.load_state_dict(state_dict, strict=True)
    return network


def _build_parsenet(
    variant: str | None, state_dict: Mapping[str, Any], device: torch.device
) -> torch.nn.Module:
    from facexlib.parsing.parsenet import ParseNet

    # The only configuration facexlib ships weights for (see facexlib.parsing.init_parsing_model).
    network = ParseNet(in_size=512, out_size=512, parsing_ch=19)
    network.load_state_dict(state_dict, strict=True)
    return network.to(device)


_StateDictBuilder = Callable[[str | None, Mapping[str, Any], "torch.device"], "torch.nn.Module"]
STATE_DICT_BUILDERS: Mapping[str, _StateDictBuilder] = {
    "RetinaFace": _build_retinaface,
    "ParseNet": _build_parsenet,
}


def build_from_state_dict(
    architecture: str,
    variant: str | None,
    state_dict: Mapping[str, Any],
    device: torch.device,
    what: str,
) -> torch.nn.Module:
    builder = STATE_DICT_BUILDERS.get(architecture)
    if builder is None:
        raise ModelError(
            f"{what}: no in-process builder for {architecture}; "
            "use ModelStore.load_state_dict() and build the network yourself"
        )
    unwrapped = unwrap_state_dict(state_dict, what)
    try:
        return builder(variant, unwrapped, device)
    except RuntimeError as exc:  # load_state_dict(strict=True): missing, unexpected or misshapen
        raise ArchitectureMismatchError(
            f"{what}: weights do not fit {architecture} ({variant or 'default'}): {exc}"
        ) from exc


def spandrel_descriptor(
    state_dict: dict[str, Any], device: torch.device, what: str
) -> ImageModelDescriptor[Any]:
    import spandrel

    from pipeline.models.defectnet import DEFECT_ARCH

    if DEFECT_ARCH.detect(state_dict):  # ours, unknown to spandrel's registry
        try:
            defects = DEFECT_ARCH.load(state_dict)
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:
            raise ArchitectureMismatchError(f"{what}: not a loadable DefectUNet: {exc}") from exc
        return defects.to(device)
    try:
        descriptor = spandrel.ModelLoader(device).load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError as exc:
        raise ArchitectureMismatchError(
            f"{what}: spandrel recognises no architecture in these weights, and they are not "
            "a facexlib RetinaFace/ParseNet or KAIR FFDNet state dict"
        ) from exc
    # A detected architecture whose loader then chokes: the detection was a false positive.
    except (RuntimeError, KeyError, ValueError, IndexError, AssertionError) as exc:
        raise ArchitectureMismatchError(
            f"{what}: spandrel could not build the model: {exc}"
        ) from exc
    # Inpainting models (LaMa) take an image and a mask: the restore stage calls them.
    if not isinstance(
        descriptor, (spandrel.ImageModelDescriptor, spandrel.MaskedImageModelDescriptor)
    ):
        raise ArchitectureMismatchError(
            f"{what}: {descriptor.architecture.id} is a {descriptor.purpose} model; "
            "scanrestore only runs image-to-image and inpainting models"
        )
    return descriptor


def detect(state_dict: dict[str, Any], what: str) -> Detected:
    """Work out what a file holds, building it once on the CPU to be sure it really loads."""
    import torch

    cpu = torch.device("cpu")
    unwrapped = unwrap(state_dict)
    # Checked before spandrel, which would accept FFDNet as a (wrong) DnCNN.
    found = _detect_facexlib(unwrapped) or _detect_ffdnet(unwrapped)
    if found is not None:
        if found.architecture in STATE_DICT_BUILDERS:
            build_from_state_dict(found.architecture, found.variant, unwrapped, cpu, what)
        return found
    descriptor = spandrel_descriptor(state_dict, cpu, what)
    return Detected(
        architecture=str(descriptor.architecture.id),
        scale=descriptor.scale,
        purpose="defects"
        if descriptor.architecture.id == "DefectUNet"
        else _SPANDREL_PURPOSES.get(descriptor.purpose, "denoise"),
        loader="spandrel",
    )


def check_descriptor(spec: ModelSpec, descriptor: ImageModelDescriptor[Any], what: str) -> None:
    actual = (str(descriptor.architecture.id), descriptor.scale)
    if actual != (spec.architecture, spec.scale):
        raise ArchitectureMismatchError(
            f"{what}: expected {spec.architecture} x{spec.scale}, "
            f"but the weights are {actual[0]} x{actual[1]}"
        )
