"""The face stage's restorer on each engine: what `auto` measures on the first aligned face
(seconds per 512 px face, first-call memory, agreement with torch fp32), conversion and first
use from a cold cache, and a face restored on the engine it picked.

    python bench/face.py [--model gfpgan|restoreformer] [--out bench/results/face.json]

GFPGAN v1.4's weights cannot be downloaded here, so the restorer is the real architecture at
its real size with random weights (speed and memory depend on the architecture, not on the
values; agreement is what the random network gives). Detection uses the real RetinaFace
mobilenet0.25. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH), str(REPO / "tests")]  # runnable from a plain checkout

SHARED = REPO.parent / "shared"
PHOTO = "corpus/faces/whole_imgs/skimage_astronaut.png"
DETECTOR = "weights/detection_mobilenet0.25_Final.pth"
DEFAULT_OUT = REPO / "bench/results/face.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("gfpgan", "restoreformer"), default="gfpgan")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"Error: {SHARED} (real weights and photos) is not present", file=sys.stderr)
        return 2
    import torch
    from modelfactory import random_gfpgan, random_restoreformer

    from pipeline.image import decode
    from pipeline.models import ModelStore
    from pipeline.stage import StageContext
    from pipeline.stages.face import FaceOptions, FaceStage

    image = decode(SHARED / PHOTO)
    with tempfile.TemporaryDirectory(prefix="scanrestore-face-") as tmp:
        store = ModelStore(Path(tmp) / "cache")
        store.import_file(SHARED / DETECTOR)
        if args.model == "gfpgan":
            store.import_file(random_gfpgan(Path(tmp) / "m.pth"), model_id="restorer")
        else:  # the released widths (random_restoreformer's docstring)
            weights = random_restoreformer(
                Path(tmp) / "m.pth", ch=64, n_embed=1024, embed_dim=256, z_channels=256
            )
            store.import_file(weights, model_id="restorer")
        ctx = StageContext(models=store, device="cpu")
        options = {"model": "restorer", "detector": "retinaface-mobilenet0.25", "parser": None}
        rows = {}
        for engine in ("auto", "torch", "openvino"):
            stage = FaceStage(FaceOptions(**options, engine=engine, fidelity=1.0))
            start = time.perf_counter()
            first = stage.run(image, ctx)
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            stage.run(image, ctx)  # warm: the engine built, one face restored and pasted
            rows[engine] = {
                "engine": first.params["engine"],
                "precision": first.params["precision"],
                "first_run_s": round(first_s, 2),
                "warm_run_s": round(time.perf_counter() - start, 2),
                "faces": first.params["faces_restored"],
            }
        calibration = (
            FaceStage(FaceOptions(**options, engine="auto"))
            .run(image, ctx)
            .params["engine_calibration"]
        )
    print(f"{args.model} (random weights, real size), {platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads, one 512 px face of {PHOTO}")  # fmt: skip
    print("\nauto's calibration (seconds of a warm call on the face):")
    for m in calibration["measurements"]:
        db = m["agreement_db"]
        agreement = "reference" if m["engine"] == "torch" else f"{db:.1f} dB" if db else "same"
        seconds = "-" if m["seconds"] is None else f"{m['seconds']:.2f} s"
        peak = "-" if m["peak_mb"] is None else f"{m['peak_mb']:.0f} MB"
        verdict = "ok" if m["passed"] else m["reason"]
        print(f"  {m['engine']:<15} {seconds:>8}  peak {peak:>8}  {agreement:>9}  {verdict}")
    print(f"  chose {calibration['choice']}; unavailable: {calibration['unavailable']}")
    print("\nstage runs (detection, restoration, paste), first from this engine's cold start:")
    for name, row in rows.items():
        print(
            f"  engine={name:<9} ran {row['engine']} {row['precision']}: "
            f"first {row['first_run_s']} s, then {row['warm_run_s']} s"
        )
    result = {
        "command": " ".join(sys.argv),
        "model": args.model,
        "threads": torch.get_num_threads(),
        "calibration": calibration,
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
