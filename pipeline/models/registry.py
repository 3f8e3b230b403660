"""The built-in models: one `ModelSpec` per official weights file, with its pinned URL and hash.

Adding a shipped model means adding one entry here; `build_registry` refuses duplicates."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.models.spec import ModelSpec, build_registry

__all__ = ["REGISTRY"]

_REAL_ESRGAN = "https://github.com/xinntao/Real-ESRGAN/releases/download"
_GFPGAN = "https://github.com/TencentARC/GFPGAN/releases/download"
_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download"
_KAIR = "https://github.com/cszn/KAIR/releases/download"

# Hashes are the values independent packagers pinned for the upstream release files (upstream
# publishes none). RestoreFormer has no agreed hash anywhere: it is pinned on first fetch/import.
REGISTRY: Mapping[str, ModelSpec] = build_registry(
    ModelSpec(
        id="realesrgan-x4plus",
        url=f"{_REAL_ESRGAN}/v0.1.0/RealESRGAN_x4plus.pth",
        sha256="4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
        bytes=67040989,
        architecture="ESRGAN",
        scale=4,
        purpose="upscale",
        licence="BSD-3-Clause",
        filename="RealESRGAN_x4plus.pth",
    ),
    ModelSpec(
        id="realesrgan-x2plus",
        url=f"{_REAL_ESRGAN}/v0.2.1/RealESRGAN_x2plus.pth",
        sha256="49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
        bytes=67061725,
        architecture="ESRGAN",
        scale=2,
        purpose="upscale",
        licence="BSD-3-Clause",
        filename="RealESRGAN_x2plus.pth",
    ),
    ModelSpec(
        id="realesr-general-x4v3",
        url=f"{_REAL_ESRGAN}/v0.2.5.0/realesr-general-x4v3.pth",
        sha256="8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292",
        bytes=4885111,
        architecture="Compact",
        scale=4,
        purpose="upscale",
        licence="BSD-3-Clause",
        filename="realesr-general-x4v3.pth",
    ),
    ModelSpec(
        id="realesr-general-wdn-x4v3",
        url=f"{_REAL_ESRGAN}/v0.2.5.0/realesr-general-wdn-x4v3.pth",
        sha256="1641f8c4464b9f097c9fdda5589273713f67cf59f3d909e0bd688f0cee269dca",
        bytes=4885111,
        architecture="Compact",
        scale=4,
        purpose="upscale",
        licence="BSD-3-Clause",
        filename="realesr-general-wdn-x4v3.pth",
    ),
    ModelSpec(
        id="realesrgan-x4plus-anime-6b",
        url=f"{_REAL_ESRGAN}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
        sha256="f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da",
        bytes=17938799,
        architecture="ESRGAN",
        scale=4,
        purpose="upscale",
        licence="BSD-3-Clause",
        filename="RealESRGAN_x4plus_anime_6B.pth",
    ),
    ModelSpec(
        id="gfpgan-1.4",
        url=f"{_GFPGAN}/v1.3.0/GFPGANv1.4.pth",
        sha256="e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad",
        bytes=348632874,
        architecture="GFPGAN",
        scale=1,
        purpose="face",
        licence="Apache-2.0",
        filename="GFPGANv1.4.pth",
    ),
    ModelSpec(
        id="gfpgan-1.3",
        url=f"{_GFPGAN}/v1.3.0/GFPGANv1.3.pth",
        sha256="c953a88f2727c85c3d9ae72e2bd4846bbaf59fe6972ad94130e23e7017524a70",
        bytes=None,
        architecture="GFPGAN",
        scale=1,
        purpose="face",
        licence="Apache-2.0",
        filename="GFPGANv1.3.pth",
    ),
    ModelSpec(
        id="restoreformer",
        url=f"{_GFPGAN}/v1.3.4/RestoreFormer.pth",
        sha256=None,
        bytes=None,
        architecture="RestoreFormer",
        scale=1,
        purpose="face",
        # Shipped as a GFPGAN (Apache-2.0) release asset; the RestoreFormer repository states none.
        licence="unspecified",
        filename="RestoreFormer.pth",
    ),
    ModelSpec(
        id="retinaface-resnet50",
        url=f"{_FACEXLIB}/v0.1.0/detection_Resnet50_Final.pth",
        sha256="6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d",
        bytes=109497761,
        architecture="RetinaFace",
        scale=1,
        purpose="detect",
        licence="MIT",
        filename="detection_Resnet50_Final.pth",
        loader="state_dict",
        variant="resnet50",
    ),
    ModelSpec(
        id="retinaface-mobilenet0.25",
        url=f"{_FACEXLIB}/v0.1.0/detection_mobilenet0.25_Final.pth",
        sha256="2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
        bytes=1789735,
        architecture="RetinaFace",
        scale=1,
        purpose="detect",
        licence="MIT",
        filename="detection_mobilenet0.25_Final.pth",
        loader="state_dict",
        variant="mobile0.25",
    ),
    ModelSpec(
        id="parsenet",
        url=f"{_FACEXLIB}/v0.2.2/parsing_parsenet.pth",
        sha256="3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2",
        bytes=85331193,
        architecture="ParseNet",
        scale=1,
        purpose="parse",
        licence="MIT",
        filename="parsing_parsenet.pth",
        loader="state_dict",
    ),
    ModelSpec(
        id="dncnn-color-blind",
        url=f"{_KAIR}/v1.0/dncnn_color_blind.pth",
        sha256="dfe11a6b703304df82cdf236f431fc6492766c7b9119d97e943edeb392c710a3",
        bytes=2678121,
        architecture="DnCNN",
        scale=1,
        purpose="denoise",
        licence="MIT",
        filename="dncnn_color_blind.pth",
    ),
)
