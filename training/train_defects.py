"""Train the DefectUNet dust and scratch detector on procedurally damaged clean photographs.

    nice -n 19 .venv/bin/python training/train_defects.py --steps 3000 --out training/runs/v1

Fixed seeds (torch, numpy, the damage generator) make a run reproducible on the same machine
and library versions. Training crops come from the allowed clean images (training.damage:
scikit-image's bundled photographs and the corpus's McMaster images), minus the validation
images, which are held out whole. Prints losses and validation recall/precision; writes
`defectunet.safetensors` and `card.json` (data, steps, metrics, code version) to --out."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.image import decode  # noqa: E402
from pipeline.models.defectnet import DefectUNet  # noqa: E402
from training.damage import COVER, damage, training_images  # noqa: E402

# Whole images kept out of training for validation: two photographs and a McMaster scene.
VALIDATION = ("coffee.png", "motorcycle_right.png", "10.tif")
SEED = 20261206


def load_images(paths: list[Path]) -> list[np.ndarray]:
    images = []
    for path in paths:
        pixels = decode(path).pixels
        images.append(np.ascontiguousarray(pixels[:, :, :3], np.float32))
    return images


def crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop at a random scale (0.5-1.25), flipped or rotated at random."""
    scale = rng.uniform(0.5, 1.25)
    h, w = image.shape[:2]
    scale = max(scale, (size + 2) / min(h, w))
    if abs(scale - 1) > 0.02:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=interpolation)
        if image.ndim == 2:
            image = image[:, :, None]
    h, w = image.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    out = image[top : top + size, left : left + size]
    out = np.rot90(out, int(rng.integers(4)))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.clip(np.ascontiguousarray(out), 0, 1)


def batch(
    images: list[np.ndarray], count: int, size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(count):
        image = images[int(rng.integers(len(images)))]
        hurt = damage(crop(image, size, rng), rng, amount=rng.uniform(0.5, 2.0))
        xs.append(hurt.pixels.transpose(2, 0, 1))
        ys.append(hurt.mask[None])
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Weighted BCE plus soft Dice: damage is a few percent of the pixels."""
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(4.0))
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


@torch.no_grad()
def validate(
    model: DefectUNet, val: tuple[torch.Tensor, torch.Tensor], threshold: float = 0.5
) -> dict[str, float]:
    """Pixel recall and precision at `threshold`; precision counts a detection within 2 px of
    damage as right (the harness's damaged region is the damage dilated by 2 px)."""
    model.eval()
    xs, ys = val
    found = torch.cat([model(xs[i : i + 8]) for i in range(0, len(xs), 8)]) >= threshold
    model.train()
    truth = ys > 0.5
    near = F.max_pool2d(truth.float(), 5, stride=1, padding=2) > 0
    recall = float((found & truth).sum() / truth.sum().clamp(min=1))
    precision = float((found & near).sum() / found.sum().clamp(min=1))
    return {"recall": recall, "precision": precision}


def code_version() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--evaluate", type=Path, help="print validation recall/precision of these weights"
    )
    parser.add_argument("--every", type=int, default=250, help="validate every N steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="stop early (the card records it)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    corpus = args.corpus if args.corpus.exists() else None
    paths = training_images(corpus)
    train_paths = [p for p in paths if p.name not in VALIDATION]
    val_paths = [p for p in paths if p.name in VALIDATION]
    held = load_images(val_paths)
    val = batch(held, 64, 128, np.random.default_rng(SEED + 1))
    if args.evaluate is not None:
        return evaluate(args.evaluate, val)
    if args.out is None:
        parser.error("--out is required for training")
    train = load_images(train_paths)
    print(f"train images {len(train)}, validation images {len(held)} (64 crops)", flush=True)

    model = DefectUNet(args.width)
    params = sum(p.numel() for p in model.parameters())
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=args.lr, total_steps=args.steps, pct_start=0.05
    )
    args.out.mkdir(parents=True, exist_ok=True)
    history, started, running = [], time.time(), 0.0
    for step in range(1, args.steps + 1):
        x, y = batch(train, args.batch, args.size, rng)
        loss = loss_fn(model.logits(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        running += loss.item()
        if step % 50 == 0:
            print(f"step {step} loss {running / 50:.4f} {time.time() - started:.0f}s", flush=True)
            running = 0.0
        out_of_time = args.max_seconds is not None and time.time() - started > args.max_seconds
        if step % args.every == 0 or step == args.steps or out_of_time:
            metrics = validate(model, val)
            history.append({"step": step, **metrics})
            print(f"validate step {step} {json.dumps(metrics)}", flush=True)
            save(model, args, history, params, train_paths, val_paths, time.time() - started)
        if out_of_time:
            print(f"stopped at step {step} of {args.steps}: --max-seconds reached", flush=True)
            break
    return 0


def evaluate(weights: Path, val: tuple[torch.Tensor, torch.Tensor]) -> int:
    from safetensors.torch import load_file

    state = load_file(str(weights))
    model = DefectUNet(int(state["enc.0.0.weight"].shape[0]))
    model.load_state_dict(state)
    for threshold in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        print(f"threshold {threshold}: {json.dumps(validate(model, val, threshold))}", flush=True)
    return 0


def save(model, args, history, params, train_paths, val_paths, seconds) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "defectunet.safetensors"))
    card = {
        "model": "DefectUNet",
        "parameters": params,
        "width": args.width,
        "licence": "the scanrestore project's own (trained here from CC0/public-domain images)",
        "data": {
            "train": [p.name for p in train_paths],
            "validation": [p.name for p in val_paths],
            "damage": "training/damage.py: scratches, specks, hairs, cracks; tone (grey, "
            "sepia, cyan, fade), blur, halftone, grain, scanner noise, JPEG, scale 0.5-1.25",
            "target": f"pixels the defects moved by more than {COVER}",
        },
        "steps": history[-1]["step"],
        "planned_steps": args.steps,
        "batch": args.batch,
        "crop": args.size,
        "lr": args.lr,
        "seed": SEED,
        "seconds": round(seconds),
        "threads": args.threads,
        "validation": history,
        "code_version": code_version(),
        "torch": torch.__version__,
    }
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
