"""`engine = "auto"`: measure each available engine on a real tile against torch fp32, keep
those that agree (>= 50 dB after 8-bit rounding) within a memory cap, pick the fastest, and
remember the choice with its numbers per (model, tile, threads, machine, engine versions)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.files import write_atomically

__all__ = [
    "DECISIONS_NAME",
    "MIN_AGREEMENT_DB",
    "Measurement",
    "calibrate",
    "machine",
    "peak_rss_mb",
    "psnr8",
    "recorded_decision",
]

MIN_AGREEMENT_DB = 50.0
_HWM_BEFORE_RESETS_KB = 0  # the process's peak as it stood before the latest VmHWM reset
DECISIONS_NAME = "calibration.json"
_FULL_SIZE_MARGIN_MB = 1024  # memory left free beyond a full-size trial's foreseen peak


@dataclass(frozen=True)
class Measurement:
    engine: str
    seconds: float | None  # a warm call on the calibration tile; None: not run at full size
    peak_mb: float | None  # resident memory the first call added at its peak (None: unknown)
    agreement_db: float | None  # vs torch fp32 after 8-bit rounding; None = identical
    passed: bool
    reason: str | None = None


def psnr8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two [0, 1] images after rounding both to 8 bits; inf when identical."""
    qa = np.round(np.clip(a, 0, 1) * 255).astype(np.float64)
    qb = np.round(np.clip(b, 0, 1) * 255).astype(np.float64)
    mse = float(np.mean((qa - qb) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def machine() -> dict[str, Any]:
    """What makes a measurement on this machine stale elsewhere."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"arch": platform.machine(), "cpu": cpu, "cpus": os.cpu_count()}


def _peak_mb(fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """Run `fn`, returning its result and the resident memory it added at its peak (Linux:
    VmHWM, reset through /proc/self/clear_refs). Freed heap is handed back first, so memory an
    earlier engine left in malloc's pools neither hides this one's peak nor counts against it."""
    global _HWM_BEFORE_RESETS_KB
    _trim_heap()
    try:
        before = _status_kb("VmRSS")
        # The reset below forgets the process's own peak so far: keep it for peak_rss_mb().
        _HWM_BEFORE_RESETS_KB = max(_HWM_BEFORE_RESETS_KB, _status_kb("VmHWM"))
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return fn(), None
    result = fn()
    return result, max(0.0, (_status_kb("VmHWM") - before) / 1024)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory since it started (Linux), including what it held
    before a calibration reset the kernel's high-water mark (VmHWM) to measure one call."""
    try:
        return round(max(_HWM_BEFORE_RESETS_KB, _status_kb("VmHWM")) / 1024, 1)
    except OSError:
        return None


def _trim_heap() -> None:
    # Not glibc: freed memory may stay resident and hide part of the next peak.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _measure(engine: Any, tile: torch.Tensor) -> tuple[np.ndarray, float, float | None]:
    """Output, seconds of a warm call, and the peak memory of the first call (where an engine
    allocates its workspace; later calls reuse it)."""
    output, peak = _peak_mb(lambda: engine.infer(tile).numpy())
    start = time.perf_counter()
    engine.infer(tile)
    return output, time.perf_counter() - start, peak


def _room_for(estimate_mb: float, memory_mb: float) -> bool:
    """Whether an engine foreseen over the cap may still be tried at full size, and judged on
    the peak it really adds. The half-tile probe scales the whole first call by the area, one-
    time and width-bound parts included, so it overstates some engines (ncnn on x4plus, 320 px:
    3739 MB foreseen, 1496 MB in a fresh process's first call): one foreseen within twice the
    cap runs where the machine has that much memory available and a margin to spare."""
    if estimate_mb > 2 * memory_mb:
        return False
    try:
        available = _meminfo_kb("MemAvailable") / 1024
    except OSError:  # not Linux: only the estimate
        return False
    return available >= estimate_mb + _FULL_SIZE_MARGIN_MB


def _meminfo_kb(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/meminfo has no {field}")


def _estimated_peak_mb(engine: Any, batch: torch.Tensor) -> float | None:
    """The first call's peak on the full tile, foreseen from a call on a tile of half the side:
    that peak times the area ratio (an overestimate, as weights and fixed workspace do not grow
    with the tile), so an engine that would pass the cap is never run at full size to find out
    (ncnn's Winograd workspace took 4.7 GB on one 256 px x4plus tile)."""
    height, width = batch.shape[-2:]
    half_h, half_w = max(8, height // 2), max(8, width // 2)
    if half_h >= height and half_w >= width:
        return None
    sizes = getattr(getattr(engine, "descriptor", None), "size_requirements", None)
    if sizes is not None and sizes.get_padding(half_w, half_h) == (width - half_w, height - half_h):
        return None  # padded back to the full tile (a face model's one size): measured as it is
    _, peak = _peak_mb(lambda: engine.infer(batch[..., :half_h, :half_w].contiguous()))
    if peak is None:
        return None
    return peak * (height * width) / (half_h * half_w)


def calibrate(
    engines: Mapping[str, Any],
    tile: np.ndarray,
    *,
    memory_mb: float,
    decisions: Path,
    key: Mapping[str, Any],
) -> tuple[str, list[Measurement], bool]:
    """The fastest engine agreeing with torch on `tile` (H, W, C float32) within `memory_mb`.

    `engines` must hold "torch", the fp32 reference. Any other entry may be a builder (a
    callable without `infer`): it is built, measured and dropped before the next is built, so
    only one candidate's memory is held at a time (x4plus with every candidate held at once
    peaked at 5.9 GB); the caller builds the chosen one again. Returns (choice, measurements,
    cached): a decision already recorded under `key` in the `decisions` file is reused as it is.
    """
    recorded = recorded_decision(decisions, key, set(engines))
    if recorded is not None:
        return *recorded, True
    record_key = _record_key(key)
    batch = torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))[None]
    reference, seconds, peak = _measure(engines["torch"], batch)
    results = [_judge("torch", seconds, peak, None, memory_mb)]
    for name, candidate in engines.items():
        if name == "torch":
            continue
        engine = candidate if hasattr(candidate, "infer") else candidate()
        estimate = _estimated_peak_mb(engine, batch)
        if estimate is not None and estimate > memory_mb and not _room_for(estimate, memory_mb):
            reason = (
                f"peak estimated at {estimate:.0f} MB from a half-size tile, over the "
                f"{memory_mb:.0f} MB cap (not run at full size)"
            )
            results.append(Measurement(name, None, round(estimate, 1), None, False, reason))
            del engine
            gc.collect()
            continue
        output, seconds, peak = _measure(engine, batch)
        db = psnr8(output, reference)
        results.append(_judge(name, seconds, peak, None if math.isinf(db) else db, memory_mb))
        del engine, output  # a built candidate's memory goes before the next is built
        gc.collect()
    passing = [m for m in results if m.passed] or [results[0]]
    choice = min(passing, key=lambda m: m.seconds).engine
    data = _read(decisions)
    data[record_key] = {
        "key": dict(key),
        "choice": choice,
        "measurements": [asdict(m) for m in results],
    }
    decisions.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(decisions, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return choice, results, False


def recorded_decision(
    decisions: Path, key: Mapping[str, Any], names: set[str]
) -> tuple[str, list[Measurement]] | None:
    """The choice and measurements already recorded under `key`, when the choice is among
    `names` (the engines available now); None: calibrate."""
    recorded = _read(decisions).get(_record_key(key))
    if recorded is None or recorded.get("choice") not in names:
        return None
    try:
        return recorded["choice"], [Measurement(**m) for m in recorded["measurements"]]
    except (KeyError, TypeError):  # a record written by another version: measure again
        return None


def _record_key(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()


def _judge(
    name: str, seconds: float, peak: float | None, db: float | None, memory_mb: float
) -> Measurement:
    reason = None
    if db is not None and db < MIN_AGREEMENT_DB:
        reason = f"agrees with torch fp32 at {db:.1f} dB < {MIN_AGREEMENT_DB:.0f} dB"
    elif peak is not None and peak > memory_mb:
        reason = f"peak {peak:.0f} MB over the {memory_mb:.0f} MB cap"
    return Measurement(name, round(seconds, 4), peak, db, reason is None, reason)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
