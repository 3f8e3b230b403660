"""Face restoration stage: RetinaFace finds faces, each is aligned to the 512 px FFHQ template,
restored by GFPGAN or RestoreFormer and pasted back through a soft mask scaled by `fidelity`,
into the image itself or into an upscaled copy of it (faces restored at output resolution).
The restorer runs through the model stages' engines (torch, ncnn, openvino, or `auto`: measured
on the first aligned face); detection and parsing stay on torch."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import torch
import torchvision
from pydantic import Field, field_validator
from spandrel import SizeRequirements

from pipeline import buffers
from pipeline.errors import DownloadError, ModelNotAvailableError, StageError
from pipeline.image import Image
from pipeline.stage import StageContext, StageOptions, StageResult
from pipeline.stages.engines import DEFAULT_ENGINE_MEMORY_MB, EngineCache
from pipeline.tiling import Engine, TileSettings, luma, resolve_device

__all__ = ["Face", "FaceOptions", "FaceStage"]

_log = logging.getLogger(__name__)

FACE_SIZE = 512
# facexlib's five points (eyes, nose tip, mouth corners) of a 512 px FFHQ-aligned face, (x, y).
_TEMPLATE = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float32,
)
# Where the crop reaches past the photo, facexlib fills this grey (given there in BGR).
_CROP_BORDER = (132 / 255, 133 / 255, 135 / 255)
# Longer sides are shrunk for detection: RetinaFace's anchors top out at 512 px, so a face in a
# huge scan is still found at this size, and the network's cost stays bounded.
_DETECT_MAX_SIDE = 1600
_NMS_IOU = 0.4  # facexlib's detect_faces default
_RETINAFACE_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
_RESTORERS = ("GFPGAN", "RestoreFormer")
# ParseNet's 19 classes; background, neck, cloth, hair and hat are not pasted (facexlib's map).
_NOT_FACE = (0, 14, 16, 17, 18)
_MIN_WEIGHT = 1 / 512  # mask weights below this (blur tails, interpolation) count as 0
_MASK_BORDER = 10  # px of the 512 crop kept out of every mask, as facexlib does
_MAX_BYTES_IN_RAM = 256 << 20  # larger outputs go to a disk-backed buffer (as upscale's default)


class FaceOptions(StageOptions):
    model: str = "gfpgan-1.4"
    detector: str = "retinaface-resnet50"
    # ParseNet face parsing for the paste mask when its weights are in the store; None (or ""
    # in TOML, which has no null) always uses the feathered ellipse.
    parser: str | None = "parsenet"
    fidelity: float = Field(0.5, ge=0, le=1)
    confidence: float = Field(0.97, ge=0, le=1)  # upstream GFPGAN's detection threshold
    min_face_px: int = Field(16, ge=0)
    only_center_face: bool = False
    max_faces: int = Field(0, ge=0)  # 0: no limit
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # The restorer's engine: auto measures each on the first aligned face and keeps the fastest
    # agreeing with torch fp32 at >= 50 dB. None: the context's ([processing].engine).
    engine: Literal["auto", "torch", "ncnn", "openvino"] | None = None
    engine_memory_mb: int = Field(DEFAULT_ENGINE_MEMORY_MB, ge=64)

    @field_validator("parser")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None


@dataclass(frozen=True)
class Face:
    """One detection in input pixel coordinates: box (x0, y0, x1, y1), score, 5 landmarks."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray  # (5, 2): left eye, right eye, nose, left and right mouth corner

    @property
    def size(self) -> float:
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))

    @property
    def centre(self) -> np.ndarray:
        return (self.box[:2] + self.box[2:]) / 2

    def as_params(self) -> dict[str, Any]:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(self.score, 4),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
        }


class FaceStage:
    """Restore faces; `fidelity` 0 leaves the image exactly as it was, 1 pastes the full face."""

    name: ClassVar[str] = "face"
    version: ClassVar[int] = 1
    Options: ClassVar[type[StageOptions]] = FaceOptions

    def __init__(self, options: FaceOptions | None = None) -> None:
        self.options = options or FaceOptions()
        self._engines = EngineCache()

    def models(self) -> list[str]:
        """The weights this stage cannot run without (the parser is optional)."""
        return [self.options.model, self.options.detector]

    def run(self, image: Image, ctx: StageContext, target: Image | None = None) -> StageResult:
        """Detect on `image`; paste into `target` (the same photo, upscaled) or into `image`."""
        opts = self.options
        base = target if target is not None else image
        scale = _target_scale(image, base)
        params: dict[str, Any] = {
            "model": opts.model,
            "detector": opts.detector,
            "fidelity": opts.fidelity,
            "confidence": opts.confidence,
            "min_face_px": opts.min_face_px,
            "only_center_face": opts.only_center_face,
            "max_faces": opts.max_faces,
            "scale": [round(scale[0], 6), round(scale[1], 6)],
        }
        if opts.fidelity == 0:
            return StageResult(image=base, params=params, skipped="fidelity is 0")
        device = resolve_device(ctx.device)
        model = _resolve_restorer(ctx, opts.model)
        params.update(model=model.id, model_sha256=model.sha256)
        found, detection = _detect(ctx, opts.detector, image, device, opts.confidence)
        faces = _select(found, opts, image.width, image.height)
        params.update(**detection, faces_found=len(found), faces=[f.as_params() for f in faces])
        if not faces:
            return StageResult(
                image=base, params={**params, "faces_restored": 0}, skipped="no faces found"
            )
        aligned = _aligned(faces)
        if not aligned:
            params.update(faces_restored=0)
            return StageResult(image=base, params=params, skipped="no face could be aligned")
        restorer, restorer_params = self._restorer(ctx, image, aligned[0][1])
        parser, mask_params = _load_parser(ctx, opts.parser, device)
        grey = _is_grey(image.pixels)
        pixels, mask, restored = _restore_faces(
            aligned, image, base, scale, restorer, parser, grey, opts.fidelity, ctx.scratch_dir
        )
        params.update(**restorer_params, **mask_params, greyscale=grey, faces_restored=restored)
        if not restored:
            return StageResult(image=base, params=params, skipped="no face could be pasted")
        return StageResult(image=base.replace(pixels=pixels), params=params, mask=mask)

    def _restorer(
        self, ctx: StageContext, image: Image, affine: np.ndarray
    ) -> tuple[Engine, dict[str, Any]]:
        """The restorer's engine (built once per device, precision and engine); `auto`
        calibrates on the first aligned face of this image."""
        opts = self.options
        ref = opts.model

        def load(device: str, dtype: torch.dtype) -> tuple[_FaceModel, dict[str, Any]]:
            loaded = ctx.models.load(ref, device=device, dtype=dtype)
            return _FaceModel.of(loaded.descriptor), {
                "model": loaded.id,
                "model_sha256": loaded.sha256,
                "architecture": loaded.descriptor.architecture.id,
            }

        def first_face(_: Any) -> np.ndarray:
            return _crop(image.pixels, affine)

        return self._engines.for_stage(ref, ctx, opts, load, first_face, image.bit_depth)


def _target_scale(image: Image, target: Image) -> tuple[float, float]:
    """The factor from `image` to `target` per axis, refusing a target of another shape."""
    if target.channels != image.channels:
        raise StageError(f"face: target has {target.channels} channels, the image {image.channels}")
    sx, sy = target.width / image.width, target.height / image.height
    # Each side was rounded on its own, so the two ratios may differ by that rounding only.
    if abs(sx - sy) > 1.0 / min(image.width, image.height):
        raise StageError(
            f"face: target {target.width}x{target.height} is not image "
            f"{image.width}x{image.height} scaled by one factor"
        )
    return sx, sy


# --- detection -------------------------------------------------------------------------------


def _detect(
    ctx: StageContext, ref: str, image: Image, device: str, confidence: float
) -> tuple[list[Face], dict[str, Any]]:
    """Every face RetinaFace finds above `confidence`, in `image` coordinates.

    facexlib's `detect_faces` keeps its per-call scale on the (shared) module, so two threads
    detecting at once would mix them up; this runs the same decoding with local state only.
    """
    from facexlib.detection.retinaface_utils import PriorBox, decode, decode_landm

    loaded = ctx.models.load(ref, device=device)
    if loaded.spec.architecture != "RetinaFace":
        raise StageError(
            f"face: detector {ref} is not a RetinaFace model ({loaded.spec.architecture})"
        )
    network = loaded.module
    small = _detection_copy(image.pixels)
    height, width = small.shape[:2]
    bgr = small[:, :, ::-1] - _RETINAFACE_MEAN_BGR
    batch = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))[None].to(device)
    with torch.inference_mode():
        loc, conf, points = network(batch)
        priors = PriorBox(network.cfg, image_size=(height, width)).forward().to(device)
        variance = network.cfg["variance"]
        boxes = decode(loc[0], priors, variance).cpu().numpy().astype(np.float64)
        marks = decode_landm(points[0], priors, variance).cpu().numpy().astype(np.float64)
        scores = conf[0, :, 1].cpu().numpy().astype(np.float64)
    # Normalised to [0, 1] of the detection copy: scale straight to the input's pixels.
    boxes *= np.array([image.width, image.height] * 2)
    marks *= np.array([image.width, image.height] * 5)
    keep = (scores > confidence) & np.isfinite(boxes).all(1) & np.isfinite(marks).all(1)
    boxes, marks, scores = boxes[keep], marks[keep], scores[keep]
    kept = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), _NMS_IOU)
    faces = [Face(boxes[i], float(scores[i]), marks[i].reshape(5, 2)) for i in kept.tolist()]
    params = {
        "detector": loaded.id,
        "detector_sha256": loaded.sha256,
        "detection_size": [width, height],
    }
    return faces, params


def _detection_copy(pixels: np.ndarray) -> np.ndarray:
    """RGB in 0..255 as RetinaFace was trained on, shrunk so the longer side is at most
    _DETECT_MAX_SIDE; greyscale is replicated to three channels."""
    height, width = pixels.shape[:2]
    factor = _DETECT_MAX_SIDE / max(height, width)
    if factor < 1:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        pixels = pixels.reshape(size[1], size[0], -1)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return pixels.astype(np.float32) * 255


def _select(faces: list[Face], opts: FaceOptions, width: int, height: int) -> list[Face]:
    """Faces large enough, optionally only the one nearest the centre, largest first."""
    kept = [face for face in faces if face.size >= opts.min_face_px]
    if opts.only_center_face and kept:
        centre = np.array([width / 2, height / 2])
        kept = [min(kept, key=lambda face: float(np.linalg.norm(face.centre - centre)))]
    kept.sort(key=lambda face: face.area, reverse=True)
    return kept[: opts.max_faces] if opts.max_faces else kept


# --- models ----------------------------------------------------------------------------------


class _FaceNet(torch.nn.Module):
    """GFPGAN or RestoreFormer as image -> image, which every engine can run: a 512 px RGB face
    in [0, 1] in, the restored face in [0, 1] out (the engine clamps)."""

    def __init__(self, model: torch.nn.Module, gfpgan: bool) -> None:
        super().__init__()
        self.model = model
        self.gfpgan = gfpgan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both architectures work in [-1, 1] (upstream normalises with mean = std = 0.5). The
        # modules are called directly: spandrel 0.4's GFPGAN wrapper neither rescales nor keeps
        # negative outputs, while its RestoreFormer wrapper does both.
        x = x * 2 - 1
        if self.gfpgan:
            # The noise stored in the checkpoint rather than fresh noise per call (upstream's
            # default): deterministic, and no global RNG shared between worker threads.
            y = self.model(x, return_rgb=False, randomize_noise=False)[0]
        else:
            y = self.model(x)[0]
        return (y + 1) / 2


@dataclass(frozen=True)
class _FaceModel:
    """What the engines read of a spandrel descriptor, for a face restorer wrapped as
    image -> image at its one size (512 px square)."""

    model: torch.nn.Module
    architecture: Any
    dtype: torch.dtype
    device: torch.device
    supports_half: bool
    supports_bfloat16: bool
    scale: int = 1
    input_channels: int = 3
    size_requirements: SizeRequirements = field(
        default_factory=lambda: SizeRequirements(minimum=FACE_SIZE, square=True)
    )

    @classmethod
    def of(cls, descriptor: Any) -> _FaceModel:
        gfpgan = descriptor.architecture.id == "GFPGAN"
        return cls(
            model=_FaceNet(descriptor.model, gfpgan).eval(),
            architecture=descriptor.architecture,
            dtype=descriptor.dtype,
            device=descriptor.device,
            supports_half=descriptor.supports_half,
            supports_bfloat16=descriptor.supports_bfloat16,
        )


def _resolve_restorer(ctx: StageContext, ref: str) -> Any:
    """The restorer's file, checked before detection so that a missing or wrong model fails on
    every image alike, not only on those with faces."""
    resolved = ctx.models.resolve(ref)
    if resolved.spec.architecture not in _RESTORERS:
        raise StageError(
            f"face: model {ref} is not GFPGAN or RestoreFormer ({resolved.spec.architecture})"
        )
    return resolved


def _load_parser(
    ctx: StageContext, ref: str | None, device: str
) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """ParseNet when its weights are at hand; otherwise the ellipse, said so in the params."""
    if ref is None:
        return None, {"mask": "ellipse"}
    try:
        loaded = ctx.models.load(ref, device=device)
    except (ModelNotAvailableError, DownloadError) as exc:
        _log.info("face: parser %s not available (%s); pasting through an ellipse", ref, exc)
        return None, {"mask": "ellipse"}
    if loaded.spec.architecture != "ParseNet":
        raise StageError(f"face: parser {ref} is not a ParseNet model ({loaded.spec.architecture})")
    return loaded.module, {"mask": "parsenet", "parser": loaded.id, "parser_sha256": loaded.sha256}


# --- masks -----------------------------------------------------------------------------------


@functools.cache
def _ellipse_mask() -> np.ndarray:
    """A feathered ellipse over the face of a 512 px aligned crop (brows to chin, cheek to
    cheek), reaching zero well inside the crop so its edges never show."""
    mask = np.zeros((FACE_SIZE, FACE_SIZE), dtype=np.float32)
    cv2.ellipse(mask, (256, 275), (160, 185), 0, 0, 360, 1.0, thickness=-1)
    mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=12)
    _clear_border(mask)
    mask.setflags(write=False)
    return mask


def _parse_mask(parser: torch.nn.Module, face: np.ndarray, device: torch.device) -> np.ndarray:
    """facexlib's parsing mask of a restored face: face classes, blurred twice, edges cleared."""
    x = torch.from_numpy(np.ascontiguousarray(face.transpose(2, 0, 1)))[None].to(device)
    with torch.inference_mode():
        logits = parser(x * 2 - 1)[0]
    classes = logits.argmax(dim=1)[0].cpu().numpy()
    is_face = np.ones(logits.shape[1], dtype=np.float32)
    is_face[list(_NOT_FACE)] = 0
    mask = is_face[classes]
    for _ in range(2):
        mask = cv2.GaussianBlur(mask, (101, 101), 11)
    mask = cv2.resize(mask, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LINEAR)
    _clear_border(mask)
    return mask


def _clear_border(mask: np.ndarray) -> None:
    mask[:_MASK_BORDER] = 0
    mask[-_MASK_BORDER:] = 0
    mask[:, :_MASK_BORDER] = 0
    mask[:, -_MASK_BORDER:] = 0


# --- align, restore, paste -------------------------------------------------------------------


def _aligned(faces: list[Face]) -> list[tuple[Face, np.ndarray]]:
    """Each face with its alignment to the template; faces whose landmarks give none are
    left out (said so in the log)."""
    aligned = []
    for face in faces:
        affine = _alignment(face.landmarks)
        if affine is None:
            _log.info("face: landmarks %s give no alignment; face skipped", face.as_params())
        else:
            aligned.append((face, affine))
    return aligned


def _restore_faces(
    aligned: list[tuple[Face, np.ndarray]],
    image: Image,
    base: Image,
    scale: tuple[float, float],
    restorer: Engine,
    parser: torch.nn.Module | None,
    grey: bool,
    fidelity: float,
    scratch_dir: Any,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Paste each face into a copy of `base`; returns pixels, the uint8 mask, faces pasted."""
    out = buffers.copy(base.pixels, max_bytes_in_ram=_MAX_BYTES_IN_RAM, scratch_dir=scratch_dir)
    mask = buffers.allocate(
        out.shape[:2], np.uint8, max_bytes_in_ram=_MAX_BYTES_IN_RAM, scratch_dir=scratch_dir
    )
    pasted = 0
    for _, affine in aligned:
        restored = _restore(restorer, _crop(image.pixels, affine))
        if grey:
            restored = np.repeat(luma(restored, TileSettings()), 3, axis=2)
        if parser is None:
            weight = _ellipse_mask()
        else:
            weight = _parse_mask(parser, restored, next(parser.parameters()).device)
        if out.shape[2] == 1:
            restored = restored[:, :, :1]
        pasted += _paste(out, mask, restored, weight, fidelity, _inverse(affine, scale))
    return out, mask, pasted


def _restore(restorer: Engine, face: np.ndarray) -> np.ndarray:
    """One aligned 512 px RGB face in [0, 1] through the restorer's engine."""
    batch = torch.from_numpy(np.ascontiguousarray(face.transpose(2, 0, 1)))[None]
    return restorer.infer(batch)[0].permute(1, 2, 0).numpy()


def _alignment(landmarks: np.ndarray) -> np.ndarray | None:
    """The similarity transform taking the five landmarks onto the template (facexlib's LMEDS
    fit), or None when they are degenerate (coincident points, a random detector's output)."""
    affine, _ = cv2.estimateAffinePartial2D(
        landmarks.astype(np.float32), _TEMPLATE, method=cv2.LMEDS
    )
    if affine is None or not np.isfinite(affine).all():
        return None
    if abs(np.linalg.det(affine[:, :2])) < 1e-8:
        return None
    return affine.astype(np.float64)


def _crop(pixels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The 512 px aligned RGB face. Only the source region under the crop is read, which keeps
    huge (disk-backed) scans cheap and within OpenCV's 32767 px limit on warp sources."""
    inverse = cv2.invertAffineTransform(affine)
    x0, y0, x1, y1 = _footprint(inverse, pixels.shape[1], pixels.shape[0])
    moved = affine.copy()
    moved[:, 2] += affine[:, :2] @ np.array([x0, y0], dtype=np.float64)
    region = np.ascontiguousarray(pixels[y0:y1, x0:x1])
    channels = pixels.shape[2]
    # The border grey is near neutral: its green is its luma to within 1/255.
    border = _CROP_BORDER if channels == 3 else (_CROP_BORDER[1],)
    if region.size == 0:
        crop = np.empty((FACE_SIZE, FACE_SIZE, channels), np.float32)
        crop[...] = border
    else:
        crop = cv2.warpAffine(
            region,
            moved,
            (FACE_SIZE, FACE_SIZE),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=border,
        ).reshape(FACE_SIZE, FACE_SIZE, channels)
    return np.repeat(crop, 3, axis=2) if channels == 1 else crop


def _inverse(affine: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Crop coordinates to output pixels. Input pixel x spans output [s*x, s*(x + 1)), centred
    at s*x + (s - 1)/2 (facexlib adds s/2, half an output pixel off)."""
    inverse = cv2.invertAffineTransform(affine)
    for axis, s in enumerate(scale):
        inverse[axis] *= s
        inverse[axis, 2] += (s - 1) / 2
    return inverse


def _footprint(transform: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel box (clipped to width x height) that the 512 px square covers under
    `transform`, with a pixel to spare for interpolation."""
    edges = np.array(
        [
            [-0.5, -0.5],
            [FACE_SIZE - 0.5, -0.5],
            [-0.5, FACE_SIZE - 0.5],
            [FACE_SIZE - 0.5, FACE_SIZE - 0.5],
        ]
    )
    corners = edges @ transform[:, :2].T + transform[:, 2]
    x0, y0 = np.floor(corners.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + 2
    return max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)


def _paste(
    out: np.ndarray,
    mask: np.ndarray,
    face: np.ndarray,
    weight: np.ndarray,
    fidelity: float,
    inverse: np.ndarray,
) -> bool:
    """Blend `face` into `out` with `fidelity` times `weight` (both 512 px) mapped through
    `inverse`: out = out * (1 - a) + face * a. Only pixels of positive weight change, and the
    mask records 1 - prod(1 - a) over the faces pasted."""
    x0, y0, x1, y1 = _footprint(inverse, out.shape[1], out.shape[0])
    if x1 <= x0 or y1 <= y0:
        return False
    moved = inverse.copy()
    moved[:, 2] -= (x0, y0)
    size = (x1 - x0, y1 - y0)
    warp = functools.partial(
        cv2.warpAffine,
        M=moved,
        dsize=size,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    alpha = np.clip(warp(np.ascontiguousarray(weight)), 0, 1)
    alpha[alpha < _MIN_WEIGHT] = 0  # interpolation dust; dropped before fidelity, so a is linear
    alpha *= np.float32(fidelity)
    inside = alpha > 0
    if not inside.any():
        return False
    region = out[y0:y1, x0:x1]
    warped = warp(face).reshape(region.shape)
    a = alpha[inside][:, None]
    region[inside] = np.clip(region[inside] * (1 - a) + warped[inside] * a, 0, 1)
    prior = mask[y0:y1, x0:x1]
    combined = np.ceil((1 - (1 - prior / np.float32(255)) * (1 - alpha)) * 255 - 1e-3)
    # At least 1 wherever a pixel changed, so 0 in the mask always means untouched.
    mask[y0:y1, x0:x1] = np.maximum(np.maximum(prior, combined), inside).astype(np.uint8)
    return True


def _is_grey(pixels: np.ndarray) -> bool:
    """One channel, or three equal ones (a black-and-white photo scanned in colour)."""
    if pixels.shape[2] == 1:
        return True
    return bool(
        np.array_equal(pixels[:, :, 0], pixels[:, :, 1])
        and np.array_equal(pixels[:, :, 1], pixels[:, :, 2])
    )
