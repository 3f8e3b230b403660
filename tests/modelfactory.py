"""Tiny randomly initialised models of the real architectures, saved the way upstream saves them.

Each builder writes a weights file and returns its path, so tests exercise the real loading code
(hashing, the weights-only unpickler, spandrel's detection) without the real, large weights.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = [
    "nearest_compact",
    "random_defectunet",
    "random_gfpgan",
    "random_lama",
    "random_parsenet",
    "random_restoreformer",
    "random_retinaface",
    "tiny_compact",
    "tiny_dncnn",
    "tiny_fbcnn",
    "tiny_ffdnet",
    "tiny_rrdbnet",
]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Deterministic weights without disturbing the global RNG other tests may rely on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _save(path: Path | str, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def tiny_rrdbnet(
    path: Path | str, scale: int = 4, *, num_filters: int = 8, num_blocks: int = 2, seed: int = 0
) -> Path:
    """An ESRGAN/Real-ESRGAN RRDBNet saved under `params_ema`, as Real-ESRGAN x4plus is.

    Scales 2 and 1 are built the Real-ESRGAN way: pixel-unshuffle the input by 2 or 4, then
    upsample 4x, so spandrel must see through the unshuffle to report the true scale.
    """
    from spandrel.architectures.ESRGAN import ESRGAN

    shuffle = {1: 4, 2: 2}.get(scale)
    with _seeded(seed):
        model = ESRGAN(
            in_nc=3 * (shuffle or 1) ** 2,
            out_nc=3,
            num_filters=num_filters,
            num_blocks=num_blocks,
            scale=scale * (shuffle or 1),
            shuffle_factor=shuffle,
        )
    return _save(path, {"params_ema": model.state_dict()})


def tiny_compact(
    path: Path | str, scale: int = 4, *, num_feat: int = 8, num_conv: int = 2, seed: int = 0
) -> Path:
    """A Real-ESRGAN SRVGGNetCompact saved under `params`, as realesr-general-x4v3 is."""
    from spandrel.architectures.Compact import Compact

    with _seeded(seed):
        model = Compact(
            num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=scale
        )
    return _save(path, {"params": model.state_dict()})


def nearest_compact(path: Path | str, scale: int = 2, *, seed: int = 0) -> Path:
    """An SRVGGNetCompact whose last convolution is zeroed: the network adds its residual to a
    nearest-neighbour upsampling of the input, so its output is exactly that upsampling. A real
    architecture through the real loading code, with an output a test can predict."""
    from spandrel.architectures.Compact import Compact

    with _seeded(seed):
        model = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale)
    last = model.body[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return _save(path, {"params": model.state_dict()})


def random_defectunet(
    path: Path | str, *, width: int = 4, seed: int = 0, colour: bool = False
) -> Path:
    """The project's DefectUNet (luma, or colour: RGB in), randomly initialised, saved as
    safetensors as it ships."""
    from safetensors.torch import save_file

    from pipeline.models.defectnet import DefectUNet

    with _seeded(seed):
        model = DefectUNet(width, colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_dncnn(
    path: Path | str, channels: int = 3, *, nc: int = 8, nb: int = 8, seed: int = 0
) -> Path:
    """A KAIR DnCNN saved as a bare state dict (KAIR's format); spandrel needs nb >= 8 to see it."""
    from spandrel.architectures.DnCNN import DnCNN

    with _seeded(seed):
        model = DnCNN(in_nc=channels, out_nc=channels, nc=nc, nb=nb, act_mode="R")
    return _save(path, model.state_dict())


def tiny_ffdnet(
    path: Path | str, channels: int = 3, *, nc: int = 8, nb: int = 4, seed: int = 0
) -> Path:
    """KAIR's FFDNet layout (no package ships the network): convs on 2x2-unshuffled input + sigma.

    Keys are `model.{0,2,...}.weight/bias`, the first conv taking 4*C + 1 channels and the last
    giving 4*C, exactly as in KAIR's network_ffdnet.py.
    """
    widths = [4 * channels + 1] + [nc] * (nb - 1) + [4 * channels]
    state_dict = {}
    with _seeded(seed):
        for index, (c_in, c_out) in enumerate(itertools.pairwise(widths)):
            state_dict[f"model.{2 * index}.weight"] = torch.randn(c_out, c_in, 3, 3) * 0.05
            state_dict[f"model.{2 * index}.bias"] = torch.zeros(c_out)
    return _save(path, state_dict)


def random_retinaface(path: Path | str, variant: str = "mobile0.25", *, seed: int = 0) -> Path:
    """facexlib's RetinaFace at its one real size (mobile0.25: ~1.7 MB; resnet50: ~105 MB)."""
    from facexlib.detection.retinaface import RetinaFace

    with _seeded(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation
        model = RetinaFace(network_name=variant, half=False, device=torch.device("cpu"))
    return _save(path, model.state_dict())


def random_parsenet(path: Path | str, *, seed: int = 0) -> Path:
    """facexlib's ParseNet at the size facexlib ships (~85 MB): it has no smaller configuration."""
    from facexlib.parsing.parsenet import ParseNet

    with _seeded(seed):
        model = ParseNet(in_size=512, out_size=512, parsing_ch=19)
    return _save(path, model.state_dict())


def random_gfpgan(path: Path | str, *, seed: int = 0) -> Path:
    """GFPGAN v1.3/v1.4's "clean" architecture at its one real size (~350 MB: spandrel builds
    it with fixed hyperparameters), saved under `params_ema` as upstream's release files are."""
    from spandrel.architectures.GFPGAN import GFPGAN

    with _seeded(seed):
        model = GFPGAN(
            out_size=512,
            num_style_feat=512,
            channel_multiplier=2,
            num_mlp=8,
            input_is_latent=True,
            different_w=True,
            narrow=1,
            sft_half=True,
        )
    return _save(path, {"params_ema": model.state_dict()})


def random_restoreformer(
    path: Path | str,
    *,
    ch: int = 32,
    n_embed: int = 32,
    embed_dim: int = 16,
    z_channels: int = 32,
    seed: int = 0,
) -> Path:
    """RestoreFormer with narrow channels (spandrel reads the widths from the weights; the six
    levels stay, so attention runs at 16 px as in the real model), saved under `params_ema`.
    The released model has ch=64, ch_mult=(1, 2, 2, 4, 4, 8), two residual blocks a level,
    n_embed=1024, embed_dim=256 and z_channels=256."""
    from spandrel.architectures.RestoreFormer import RestoreFormer

    with _seeded(seed):
        model = RestoreFormer(
            n_embed=n_embed,
            embed_dim=embed_dim,
            ch=ch,
            ch_mult=(1, 1, 1, 1, 1, 1),
            num_res_blocks=1,
            z_channels=z_channels,
        )
    return _save(path, {"params_ema": model.state_dict()})


def tiny_fbcnn(path: Path | str, channels: int = 3, *, nc: int = 8, seed: int = 0) -> Path:
    """A KAIR FBCNN (JPEG artefact removal) saved as a bare state dict, as its release is.

    Narrow upper levels and two blocks per level (with one, KAIR's `sequential` unwraps the
    block and spandrel no longer recognises the keys); the bottleneck stays at 512 channels
    because FBCNN's quality-factor head is hard-wired to 512 features (~28 M parameters,
    ~113 MB), so build it once per test session.
    """
    from spandrel.architectures.FBCNN import FBCNN

    with _seeded(seed):
        model = FBCNN(in_nc=channels, out_nc=channels, nc=[nc, 2 * nc, 4 * nc, 512], nb=2)
    return _save(path, model.state_dict())


def random_lama(path: Path | str, *, seed: int = 0) -> Path:
    """LaMa (big-lama's generator) at its one size (~51 M parameters, ~205 MB): spandrel builds
    it with fixed widths, so it cannot be made smaller; build it once per test session. Keys
    are named `generator.model...`, as in LaMa's own training checkpoints."""
    from spandrel.architectures.LaMa import LaMa

    with _seeded(seed):
        model = LaMa(in_nc=4, out_nc=3)
    state = {
        "generator." + key.removeprefix("model."): value
        for key, value in model.state_dict().items()
    }
    return _save(path, state)
