"""Quality harness on ../shared/corpus: how much each method improves real photos.

    .venv/bin/python bench/quality.py [--pairs N] [--out bench/results/quality.json]

Denoise: every PolyU real high-ISO pair (noisy `*_real`, clean `*_mean`), PSNR and SSIM of the
noisy input and of each method's output against the clean image. Prints a table, writes JSON.
Exits 2 where ../shared is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.image import decode  # noqa: E402
from pipeline.models import ModelStore  # noqa: E402
from pipeline.stage import StageContext  # noqa: E402
from pipeline.stages.denoise import DenoiseOptions, DenoiseStage  # noqa: E402

SHARED = REPO.parent / "shared"
POLYU = SHARED / "corpus" / "real_lr_hr_pairs" / "PolyU_real_noise"
WEIGHTS = SHARED / "weights"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR after 8-bit rounding."""
    mse = float(np.mean((np.rint(a * 255) - np.rint(b * 255)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over channels (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5)."""
    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for x, y in zip(np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0), strict=True):
        x, y = x.astype(np.float64), y.astype(np.float64)

        def blur(v: np.ndarray) -> np.ndarray:
            return cv2.GaussianBlur(v, (11, 11), 1.5)

        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        num = (2 * mx * my + c1) * (2 * cov + c2)
        den = (mx**2 + my**2 + c1) * (vx + vy + c2)
        scores.append(float(np.mean(num / den)))
    return float(np.mean(scores))


def denoise_methods() -> dict[str, DenoiseStage]:
    return {
        "nlm h=8": DenoiseStage(DenoiseOptions(method="nlm", h=8)),
        "nlm h=8 strength 0.5": DenoiseStage(DenoiseOptions(method="nlm", h=8, strength=0.5)),
        "dncnn colour blind": DenoiseStage(
            DenoiseOptions(method="dncnn", model=str(WEIGHTS / "dncnn_color_blind.pth"))
        ),
    }


def bench_denoise(ctx: StageContext, limit: int | None) -> list[dict]:
    rows = []
    methods = denoise_methods()
    for noisy_path in sorted(POLYU.glob("*_real.JPG"))[:limit]:
        noisy = decode(noisy_path)
        clean = decode(noisy_path.with_name(noisy_path.name.replace("_real.", "_mean."))).pixels
        row = {
            "pair": noisy_path.name.removesuffix("_real.JPG"),
            "noisy": {"psnr": psnr(noisy.pixels, clean), "ssim": ssim(noisy.pixels, clean)},
        }
        for name, stage in methods.items():
            started = time.perf_counter()
            out = stage.run(noisy, ctx).image.pixels
            row[name] = {
                "psnr": psnr(out, clean),
                "ssim": ssim(out, clean),
                "seconds": time.perf_counter() - started,
            }
        rows.append(row)
        print(f"  {row['pair']}", file=sys.stderr)
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    names = [key for key in rows[0] if key != "pair"]
    return {
        name: {
            metric: float(np.mean([row[name][metric] for row in rows]))
            for metric in ("psnr", "ssim")
        }
        for name in names
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, help="only the first N PolyU pairs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: no corpus to measure", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as cache:
        ctx = StageContext(models=ModelStore(Path(cache)), device="cpu", precision="fp32")
        rows = bench_denoise(ctx, args.pairs)
    summary = summarise(rows)
    print(f"denoise, PolyU real noise, {len(rows)} pairs (mean against the clean image):")
    print(f"{'method':<24}{'PSNR dB':>9}{'gain dB':>9}{'SSIM':>8}")
    for name, scores in summary.items():
        gain = scores["psnr"] - summary["noisy"]["psnr"]
        print(f"{name:<24}{scores['psnr']:>9.2f}{gain:>+9.2f}{scores['ssim']:>8.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"denoise": {"pairs": rows, "mean": summary}}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
