"""Train the DefectUNet dust and scratch detector on procedurally damaged clean photographs.

    nice -n 10 .venv/bin/python training/train_defects.py --steps 1700 --threads 2 \
        --out training/runs/v1

Fixed seeds (torch, numpy, the damage generator) make a run reproducible on the same machine
and library versions. Training crops come from the allowed clean images (training.damage:
scikit-image's bundled photographs, the corpus's McMaster images and City100's H frames),
minus the validation images, which are held out whole. A share of the crops is left undamaged,
so that the network also learns from clean texture and highlights alone. Prints losses and
validation recall/precision over a sweep of thresholds; writes `defectunet.safetensors`, a
copy per validation (`step-N.safetensors`, so a run stopped early keeps usable weights) and
`card.json` (data, steps, metrics, code version) to --out."""

from __future__ import annotations

import argparse
import json
import math
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

from pipeline.files import sha256_file  # noqa: E402
from pipeline.image import decode  # noqa: E402
from pipeline.models.defectnet import CHROMA_FEATURES, FEATURES, DefectUNet  # noqa: E402
from pipeline.stages.restore.learned import mask_from_probability  # noqa: E402
from pipeline.stages.restore.shared import LUMA  # noqa: E402
from pipeline.tiling import cpu_has_fast_bf16  # noqa: E402
from training.damage import COVER, damage, graphics, training_images  # noqa: E402

# Whole images kept out of training for validation: two photographs, a McMaster scene and a
# City100 street.
VALIDATION = ("coffee.png", "motorcycle_right.png", "10.tif", "051H.PNG")
SEED = 20261206
CLEAN_SHARE = 0.15  # crops left without defects
# Crops drawn by training.damage.graphics (text, rules, outlines, cartoon shapes), damaged like
# the photographs: the hard negatives of slides, documents and line art.
GRAPHICS_SHARE = 0.25
VALIDATION_GRAPHICS = 24  # graphics crops added to the 80 photograph crops of validation
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
# The network's target: the defects' clearly visible cores, pixels a defect moved by this much
# or more. The faint skirt between COVER (2/255, what the harness counts as damage) and CORE is
# left out of the loss: under grain, blur or JPEG much of it cannot be seen, and a target there
# taught earlier recipes to smear their probability over everything near an edge. The stage
# covers the skirt by hysteresis and by growing its mask (pipeline/stages/restore/learned.py).
CORE = 16 / 255
# The loss also ignores a ring this wide around the cores, where the skirt lies and where a
# detection is neither right nor wrong (the harness counts a detection within 2 px of the
# damage as right).
RING = 2


def load_images(paths: list[Path]) -> list[np.ndarray]:
    images = []
    for path in paths:
        pixels = decode(path).pixels
        images.append(np.ascontiguousarray(pixels[:, :, :3], np.float32))
    return images


def crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    centre: tuple[int, int] | None = None,
) -> np.ndarray:
    """A random crop at a random scale (0.5-1.25), flipped or rotated at random; with `centre`
    (row, column), a crop around that point (within a quarter of the crop) at 0.8-1.2."""
    scale = rng.uniform(0.5, 1.25) if centre is None else rng.uniform(0.8, 1.2)
    h, w = image.shape[:2]
    scale = max(scale, (size + 2) / min(h, w))
    if abs(scale - 1) > 0.02:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=interpolation)
        if image.ndim == 2:
            image = image[:, :, None]
    h, w = image.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    if centre is not None:
        jitter = rng.integers(-size // 4, size // 4 + 1, 2)
        top = int(np.clip(round(centre[0] * scale) - size // 2 + jitter[0], 0, h - size))
        left = int(np.clip(round(centre[1] * scale) - size // 2 + jitter[1], 0, w - size))
    out = image[top : top + size, left : left + size]
    out = np.rot90(out, int(rng.integers(4)))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.clip(np.ascontiguousarray(out), 0, 1)


def batch(
    images: list[np.ndarray],
    count: int,
    size: int,
    rng: np.random.Generator,
    graphics_share: float = GRAPHICS_SHARE,
    hard: list[tuple[int, int, int]] | None = None,
    hard_share: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Damaged RGB crops (N, 3, H, W) and how far the defects moved each of their pixels; a
    `hard_share` of them centred on `hard` negatives (image index, row, column)."""
    xs, cs = [], []
    for _ in range(count):
        index = int(rng.integers(len(images)))
        image, centre = images[index], None
        if hard and rng.random() < hard_share:
            index, row, column = hard[int(rng.integers(len(hard)))]
            image, centre = images[index], (row, column)
        amount = 0.0 if rng.random() < CLEAN_SHARE else rng.uniform(0.5, 2.0)
        if centre is None and rng.random() < graphics_share:
            big = size * 2
            image = graphics(big, rng, photo=crop(image, big, rng))
        hurt = damage(crop(image, size, rng, centre), rng, amount=amount)
        xs.append(hurt.pixels.transpose(2, 0, 1))
        cs.append(hurt.coverage[None])
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(cs))


def grow(mask: torch.Tensor, pixels: int = RING) -> torch.Tensor:
    return F.max_pool2d(mask.float(), 2 * pixels + 1, stride=1, padding=pixels)


@torch.no_grad()
def mine_hard_negatives(
    model: DefectUNet, images: list[np.ndarray], threshold: float = 0.5
) -> list[tuple[int, int, int]]:
    """Where `model` (a colour DefectUNet) marks undamaged training images (as they are, and
    as grey): the centre of each component its mask (mask_from_probability at `threshold`)
    finds, as (image index, row, column). None of it is damage: every one is a false detection."""
    model.eval()
    found = []
    for index, image in enumerate(images):
        h, w = image.shape[:2]
        if image.shape[2] == 1:
            versions = [np.repeat(image, 3, axis=2)]
        else:
            luma = image @ LUMA
            versions = [image, np.repeat(luma[:, :, None], 3, axis=2)]
        for version in versions:
            padded = np.pad(version, ((0, -h % 8), (0, -w % 8), (0, 0)), mode="edge")
            x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None]
            probability = model(x)[0, 0, :h, :w].numpy()
            mask = mask_from_probability(probability, threshold)
            count, _, _, centres = cv2.connectedComponentsWithStats(mask, connectivity=8)
            found += [(index, int(cy), int(cx)) for cx, cy in centres[1:count]]
    model.train()
    return found


def target_and_care(coverage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The core target (moved by >= CORE) and where the loss looks: everywhere but the faint
    skirt (moved by COVER..CORE) and the RING around the cores."""
    target = (coverage >= CORE).float()
    faint = ((coverage >= COVER) & (coverage < CORE)).float()
    care = (1 - (grow(target) - target)) * (1 - faint)
    return target, care


def loss_fn(logits: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Focal BCE (unweighted classes: every false detection costs as much as a miss, and the
    hard ones, highlights and texture, most) plus a Tversky term that charges false positives
    more than misses, on the cores of the defects (target_and_care)."""
    target, care = target_and_care(coverage)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    hit = prob * target + (1 - prob) * (1 - target)
    focal = ((1 - hit) ** 2 * bce * care).sum() / care.sum() * 10
    tp = (prob * target * care).sum()
    fp = (prob * (1 - target) * care).sum()
    fn = ((1 - prob) * target * care).sum()
    tversky = 1 - (tp + 1) / (tp + 0.6 * fp + 0.4 * fn + 1)
    return focal + tversky


@torch.no_grad()
def validate(
    model: DefectUNet, val: tuple[torch.Tensor, torch.Tensor], thresholds=THRESHOLDS
) -> list[dict[str, float]]:
    """Pixel recall and precision of the stage's own mask (mask_from_probability: threshold,
    hysteresis, growth) at each threshold; precision counts a detection within 2 px of damage
    as right (the harness's damaged region is the damage dilated by 2 px). `clean_marked`: the
    share of the undamaged crops' pixels marked."""
    model.eval()
    xs, coverage = val
    prob = torch.cat([model(xs[i : i + 8]) for i in range(0, len(xs), 8)])[:, 0].numpy()
    model.train()
    damaged = coverage >= COVER  # the harness's definition of damage, not the core target
    truth = damaged[:, 0].numpy()
    near = grow(damaged, 2)[:, 0].numpy() > 0
    clean = ~truth.any(axis=(1, 2))
    rows = []
    for threshold in thresholds:
        found = np.stack([mask_from_probability(p, threshold) > 0 for p in prob])
        rows.append(
            {
                "threshold": threshold,
                "recall": round(float((found & truth).sum() / max(1, truth.sum())), 4),
                "precision": round(float((found & near).sum() / max(1, found.sum())), 4),
                "clean_marked": round(float(found[clean].mean()) if clean.any() else 0.0, 6),
            }
        )
    return rows


def choose_threshold(sweep: list[dict[str, float]], precision: float = 0.85) -> float | None:
    """The lowest threshold whose validation precision reaches `precision` (the acceptance
    bar, 0.8, with a margin for images unlike the validation ones)."""
    passing = [row["threshold"] for row in sweep if row["precision"] >= precision]
    return min(passing, default=None)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


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
    parser.add_argument("--steps", type=int, default=1700)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--evaluate", type=Path, help="print validation recall/precision of these weights"
    )
    parser.add_argument(
        "--card",
        type=Path,
        help="with --evaluate: write a card for these weights here (the run's card.json beside "
        "the weights, plus these weights' step, SHA-256, sweep and chosen threshold)",
    )
    parser.add_argument("--every", type=int, default=150, help="validate every N steps")
    parser.add_argument(
        "--init", type=Path, help="start from these weights (a colour DefectUNet of --width)"
    )
    parser.add_argument(
        "--hard-share",
        type=float,
        default=0.0,
        help="with --init: this share of the crops is centred on what the initial weights mark "
        "on the undamaged training images (mine_hard_negatives), the false detections to unlearn",
    )
    parser.add_argument(
        "--graphics-share",
        type=float,
        default=GRAPHICS_SHARE,
        help="the share of training crops drawn by training.damage.graphics (text, rules, "
        "outlines: dark lines that are content, not damage)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="autocast the forward pass to bf16 (weights and optimiser stay fp32); auto: bf16 "
        "only where the CPU has native bf16 kernels (AVX-512 BF16 or AMX), where it is about "
        "twice as fast a step; emulated elsewhere, about ten times slower, so fp32 there",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="stop early (the card records it)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.graphics_share <= 1:
        parser.error(f"--graphics-share: {args.graphics_share} is not a share between 0 and 1")
    args.code_version = code_version()  # at the start: the code may change during a long run

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    corpus = args.corpus if args.corpus.exists() else None
    paths = training_images(corpus)
    train_paths = [p for p in paths if p.name not in VALIDATION]
    val_paths = [p for p in paths if p.name in VALIDATION]
    held = load_images(val_paths)
    val = batch(held, 80, 128, np.random.default_rng(SEED + 1), graphics_share=0.0)
    drawn = batch(held, VALIDATION_GRAPHICS, 128, np.random.default_rng(SEED + 2), 1.0)
    val = (torch.cat([val[0], drawn[0]]), torch.cat([val[1], drawn[1]]))
    if args.evaluate is not None:
        return evaluate(args.evaluate, val, args.card)
    if args.out is None:
        parser.error("--out is required for training")
    train = load_images(train_paths)
    print(
        f"train images {len(train)}, validation images {len(held)} "
        f"(80 + {VALIDATION_GRAPHICS} crops)",
        flush=True,
    )

    if args.precision == "auto":
        args.precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    print(f"precision {args.precision} on {cpu_name()}", flush=True)
    model = DefectUNet(args.width, colour=True)
    hard: list[tuple[int, int, int]] = []
    if args.init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(args.init)))
        args.init_sha256 = sha256_file(args.init)  # recorded in every card this run writes
        if args.hard_share > 0:
            hard = mine_hard_negatives(model, train)
            print(f"hard negatives: {len(hard)} false detections on the clean images", flush=True)
    else:
        with torch.no_grad():  # start from the prior that damage is rare (as RetinaNet does)
            model.defectunet.head.bias.fill_(-2.0)
    params = sum(p.numel() for p in model.parameters())
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    args.out.mkdir(parents=True, exist_ok=True)
    history, started, running = [], time.time(), 0.0
    for step in range(1, args.steps + 1):
        x, coverage = batch(
            train,
            args.batch,
            args.size,
            rng,
            graphics_share=args.graphics_share,
            hard=hard,
            hard_share=args.hard_share,
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = model.logits(x)
        loss = loss_fn(logits.float(), coverage)
        optimiser.zero_grad()
        loss.backward()
        done = step / args.steps
        if args.max_seconds is not None:
            done = max(done, (time.time() - started) / args.max_seconds)
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(args.lr, done)
        optimiser.step()
        running += loss.item()
        if step % 50 == 0:
            print(f"step {step} loss {running / 50:.4f} {time.time() - started:.0f}s", flush=True)
            running = 0.0
        out_of_time = done >= 1 and step < args.steps
        if step % args.every == 0 or step == args.steps or out_of_time:
            metrics = validate(model, val)
            history.append(
                {
                    "step": step,
                    "seconds": round(time.time() - started),
                    "lr": optimiser.param_groups[0]["lr"],
                    "sweep": metrics,
                }
            )
            for row in metrics:
                print(f"validate step {step} {json.dumps(row)}", flush=True)
            save(model, args, history, params, train_paths, val_paths, time.time() - started, hard)
        if out_of_time:
            print(f"stopped at step {step} of {args.steps}: --max-seconds reached", flush=True)
            break
    return 0


def learning_rate(peak: float, done: float) -> float:
    """One cycle over the run: a 5 % linear warm-up to `peak`, then a cosine down to 1 %.
    `done` is the share of the run behind us: of the steps, or of --max-seconds where that
    comes first, so that a run on a busy shared CPU still anneals before its time is up."""
    if done < 0.05:
        return peak * (0.1 + 0.9 * done / 0.05)
    cosine = (1 + math.cos(math.pi * min(1.0, (done - 0.05) / 0.95))) / 2
    return peak * (0.01 + 0.99 * cosine)


def evaluate(weights: Path, val: tuple[torch.Tensor, torch.Tensor], card: Path | None) -> int:
    from safetensors.torch import load_file

    state = load_file(str(weights))
    width, first = state["enc.0.0.weight"].shape[:2]
    model = DefectUNet(int(width), colour=first == FEATURES + CHROMA_FEATURES)
    model.load_state_dict(state)
    sweep = validate(model, val)
    for row in sweep:
        print(json.dumps(row), flush=True)
    threshold = choose_threshold(sweep)
    print(json.dumps({"chosen_threshold": threshold}), flush=True)
    if card is not None:
        run = json.loads((weights.parent / "card.json").read_text())
        step = weights.stem.removeprefix("step-")
        run["chosen"] = {
            "weights": weights.name,
            "step": int(step) if step.isdigit() else run["steps"],
            "sha256": sha256_file(weights),
            "threshold": threshold,
            "threshold_rule": "the lowest validation threshold with precision >= 0.85",
            "validation": sweep,
        }
        card.write_text(json.dumps(run, indent=2) + "\n")
    return 0


def save(model, args, history, params, train_paths, val_paths, seconds, hard=()) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "defectunet.safetensors"))
    save_file(state, str(args.out / f"step-{history[-1]['step']}.safetensors"))
    card = {
        "model": "DefectUNet",
        "parameters": params,
        "width": args.width,
        "input": "RGB: the luma's features and the chroma's (pipeline.models.defectnet); a "
        "grey crop has zero chroma",
        "licence": "the scanrestore project's own (trained here from CC0/public-domain images)",
        "data": {
            "train": [p.name for p in train_paths],
            "validation": [p.name for p in val_paths],
            "validation_crops": f"80 photograph crops + {VALIDATION_GRAPHICS} graphics crops "
            "(text, rules, outlines) on the validation images, all 128 px, seeded",
            "damage": "training/damage.py: scratches, specks, hairs, cracks (near neutral, a "
            "fifth of hairs and scratches coloured); tone (grey, sepia, cyan, fade), blur, "
            "halftone, colour grain, scanner noise, colour JPEG, scale 0.5-1.25",
            "graphics": f"{args.graphics_share:.0%} of crops drawn by training.damage.graphics "
            "(text, bullets, rules, tables, outlines, cartoon shapes) over paper or a photograph",
            "target": f"pixels the defects moved by {CORE:.4f} or more (the cores); the skirt "
            f"moved by {COVER:.4f}..{CORE:.4f} and a {RING} px ring around the cores are left "
            "out of the loss, which the stage's hysteresis and growth cover; validation "
            f"recall counts every pixel moved by {COVER:.4f} or more, as the harness does",
        },
        "steps": history[-1]["step"],
        "planned_steps": args.steps,
        "batch": args.batch,
        "clean_share": CLEAN_SHARE,
        "graphics_share": args.graphics_share,
        "precision": f"{args.precision} (forward autocast; weights, optimiser and validation fp32)",
        "cpu": cpu_name(),
        "cpu_native_bf16": cpu_has_fast_bf16(),
        "loss": "focal BCE (gamma 2) + Tversky (FP 0.6, FN 0.4) on the cores, the faint "
        "skirt and the grown ring ignored",
        "crop": args.size,
        "lr": args.lr,
        "schedule": "5 % warm-up, cosine to 1 %, over the steps or --max-seconds, whichever "
        "comes first (so the step count, not the seed alone, fixes the run)",
        "max_seconds": args.max_seconds,
        "init": None
        if args.init is None
        else {"weights": args.init.name, "sha256": args.init_sha256},
        "hard_negatives": {
            "share": args.hard_share,
            "count": len(hard),
            "how": "components the initial weights mark at 0.5 on the undamaged training "
            "images, as they are and as grey; crops centred on one (within a quarter crop)",
        }
        if hard
        else None,
        "seed": SEED,
        "seconds": round(seconds),
        "threads": args.threads,
        "validation": history,
        "code_version": args.code_version,
        "torch": torch.__version__,
    }
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
