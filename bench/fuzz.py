"""Fuzz the decode and metadata path with mutated real files, for a given time.

    .venv/bin/python bench/fuzz.py [--seconds 600] [--seed 0] [--batch 200]
        [--max-pixels 16000000] [--out bench/results/fuzz.json]

Seeds are the small files (under 100 KB) of ../shared/corpus/metadata_edge_cases and
hostile_inputs. Each example takes one seed and applies one to three mutations, drawn by
Hypothesis: bit flips (biased towards the header), truncation, a length, count, offset or
dimension field set to an edge value (PNG chunk lengths and IHDR, JPEG segment lengths and SOF,
TIFF and EXIF directory counts, entry counts and offsets, RIFF/WebP chunk sizes), bytes inserted,
a range deleted or repeated. The property, the worker's own path without the model:

- `decode` returns a valid Image (float32 pixels in [0, 1], (H, W, 1 or 3), matching alpha,
  depth 8 or 16) or raises an ImageError whose message starts with the file's path; any other
  exception is a finding;
- a decoded image is stamped with provenance (pipeline.stamp) and encoded to its own format;
  that raises nothing but EncodeError, and our own output decodes again;
- nothing crashes or hangs: the batches run in a child process; a child killed by a signal
  (a decoder's segfault) leaves its last input, saved as a finding, and a new child goes on
  from the next batch seed; an example running past `--hang-seconds` is saved the same way.

Hypothesis runs in batches of `--batch` examples, each batch from its own seed, until the time
is up; a failing batch is shrunk to a minimal input, saved under bench/results/fuzz-findings/,
and the run goes on. The JSON reports duration, examples, outcomes by kind and the findings
(examples of a batch a child died in are not counted). tests/test_fuzz.py runs the same
strategies for 1500 examples in CI. Exits 1 with findings, 2 where ../shared (the corpus) is
absent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.errors import EncodeError, ImageError  # noqa: E402
from pipeline.image import FORMATS, decode, encode, suffix_for  # noqa: E402
from pipeline.stamp import stamp  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
FINDINGS = REPO / "bench" / "results" / "fuzz-findings"
SEED_FOLDERS = ("metadata_edge_cases", "hostile_inputs")
SEED_LIMIT = 100_000  # bytes: small seeds keep each example to milliseconds
ENCODE_LIMIT = 1_000_000  # pixels: larger decoded images are not re-encoded (time)


# ---------------------------------------------------------------- seeds and their fields


@dataclass(frozen=True)
class Field:
    """A length, count, offset or dimension in a seed: where, how wide, which byte order."""

    position: int
    width: int  # bytes: 2 or 4
    order: str  # "big" or "little"


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    fields: tuple[Field, ...]
    decodes: bool  # the unmutated file decodes: mutations of it reach deepest


def load_seeds(corpus: Path = CORPUS) -> list[Seed]:
    """The small non-empty files of the corpus folders, each with its structural fields."""
    seeds = []
    for folder in SEED_FOLDERS:
        directory = corpus / folder
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            size = path.stat().st_size
            if 0 < size <= SEED_LIMIT:
                data = path.read_bytes()
                fields = tuple(structural_fields(data))
                seeds.append(Seed(path.name, data, fields, _decodes(path)))
    return seeds


def _decodes(path: Path) -> bool:
    try:
        decode(path)
    except ImageError:
        return False
    return True


def structural_fields(data: bytes) -> list[Field]:
    """Where the container keeps lengths, counts, offsets and sizes, as far as it parses."""
    fields: list[Field] = []
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        fields += _png_fields(data)
    elif data.startswith(b"\xff\xd8"):
        fields += _jpeg_fields(data)
    elif data[:4] in (b"II*\0", b"MM\0*"):
        fields += _tiff_fields(data, 0)
    elif data[:4] == b"RIFF":
        fields += _riff_fields(data)
    # EXIF blocks inside JPEG APP1, PNG eXIf or WebP EXIF chunks are TIFF structures too.
    for magic in (b"II*\0", b"MM\0*"):
        start = data.find(magic, 1)
        while start > 0 and len(fields) < 4096:
            fields += _tiff_fields(data, start)
            start = data.find(magic, start + 4)
    return fields


def _png_fields(data: bytes) -> list[Field]:
    fields, position = [], 8
    while position + 8 <= len(data):
        fields.append(Field(position, 4, "big"))
        (length,) = struct.unpack_from(">I", data, position)
        if data[position + 4 : position + 8] == b"IHDR":
            fields += [Field(position + 8, 4, "big"), Field(position + 12, 4, "big")]
        position += 12 + length
    return fields


def _jpeg_fields(data: bytes) -> list[Field]:
    fields, position = [], 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            position += 2
            continue
        fields.append(Field(position + 2, 2, "big"))
        if marker in (0xC0, 0xC1, 0xC2):  # frame header: height, width
            fields += [Field(position + 5, 2, "big"), Field(position + 7, 2, "big")]
        if marker == 0xDA:
            break
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return fields


def _tiff_fields(data: bytes, base: int) -> list[Field]:
    """Classic TIFF at `base`: the first-IFD offset, each directory's count, and each entry's
    count and value-or-offset, for IFD0 and the directories its entries point to."""
    order = "little" if data[base : base + 2] == b"II" else "big"
    fields = [Field(base + 4, 4, order)]
    pending, seen = [int.from_bytes(data[base + 4 : base + 8], order)], set()
    while pending and len(seen) < 8:
        offset = pending.pop()
        if offset in seen or base + offset + 2 > len(data):
            continue
        seen.add(offset)
        at = base + offset
        fields.append(Field(at, 2, order))
        count = int.from_bytes(data[at : at + 2], order)
        for index in range(min(count, 64)):
            entry = at + 2 + 12 * index
            if entry + 12 > len(data):
                break
            fields += [Field(entry + 4, 4, order), Field(entry + 8, 4, order)]
            tag = int.from_bytes(data[entry : entry + 2], order)
            if tag in (0x8769, 0x8825, 0xA005, 0x014A):  # Exif, GPS, Interop, SubIFDs
                pending.append(int.from_bytes(data[entry + 8 : entry + 12], order))
        next_at = at + 2 + 12 * count
        if next_at + 4 <= len(data):
            fields.append(Field(next_at, 4, order))
            pending.append(int.from_bytes(data[next_at : next_at + 4], order))
    return fields


def _riff_fields(data: bytes) -> list[Field]:
    fields, position = [Field(4, 4, "little")], 12
    while position + 8 <= len(data):
        fields.append(Field(position + 4, 4, "little"))
        if data[position : position + 4] == b"VP8X":  # canvas width-1, height-1 (24-bit)
            fields += [Field(position + 12, 2, "little"), Field(position + 15, 2, "little")]
        size = int.from_bytes(data[position + 4 : position + 8], "little")
        position += 8 + size + (size & 1)
    return fields


# ---------------------------------------------------------------- mutations


Draw = Callable[[st.SearchStrategy[Any]], Any]


def _position(draw: Draw, size: int) -> int:
    """A byte position, half the time within the first kilobyte, where the headers are."""
    return draw(st.one_of(st.integers(0, min(size, 1024) - 1), st.integers(0, size - 1)))


def flip_bits(draw: Draw, data: bytearray, seed: Seed) -> bytearray:
    for _ in range(draw(st.integers(1, 8))):
        data[_position(draw, len(data))] ^= 1 << draw(st.integers(0, 7))
    return data


def truncate(draw: Draw, data: bytearray, seed: Seed) -> bytearray:
    return data[: draw(st.integers(0, len(data) - 1))]


def corrupt_field(draw: Draw, data: bytearray, seed: Seed) -> bytearray:
    fields = [f for f in seed.fields if f.position + f.width <= len(data)]
    if not fields:
        return flip_bits(draw, data, seed)
    where = draw(st.sampled_from(fields))
    top = (1 << (8 * where.width)) - 1
    old = int.from_bytes(data[where.position : where.position + where.width], where.order)
    value = draw(
        st.sampled_from(
            [0, 1, 2, top, top >> 1, (top >> 1) + 1, old + 1, old - 1, old * 2, old // 2, len(data)]
        )
        | st.integers(0, top)
    )
    span = slice(where.position, where.position + where.width)
    data[span] = (value & top).to_bytes(where.width, where.order)
    return data


def insert_bytes(draw: Draw, data: bytearray, seed: Seed) -> bytearray:
    at = _position(draw, len(data))
    data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return data


def delete_range(draw: Draw, data: bytearray, seed: Seed) -> bytearray:
    at = _position(draw, len(data))
    del data[at : at + draw(st.integers(1, 64))]
    return data


def repeat_range(draw: Draw, data: bytearray, seed: Seed) -> bytearray:
    at = _position(draw, len(data))
    piece = data[at : at + draw(st.integers(1, 256))]
    to = _position(draw, len(data))
    data[to:to] = piece * draw(st.integers(1, 4))
    return data


MUTATIONS = (flip_bits, truncate, corrupt_field, insert_bytes, delete_range, repeat_range)


def fix_png_crcs(data: bytearray) -> bytearray:
    """Recompute every PNG chunk's CRC, so that a mutation reaches the parsers behind the
    CRC check (inflate, the metadata chunks) instead of stopping at it."""
    position = 8
    while position + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, position)
        end = position + 8 + length
        if end + 4 > len(data):
            break
        struct.pack_into(">I", data, end, zlib.crc32(data[position + 4 : end]))
        position = end + 4
    return data


@st.composite
def mutated(draw: Draw, seeds: list[Seed]) -> tuple[str, bytes]:
    """(the seed's name, its bytes after one to three mutations). Three times in four the
    seed is one that decodes, so that mutations get past the first check."""
    good = [s for s in seeds if s.decodes] or seeds
    chosen = draw(st.sampled_from(good) if draw(st.integers(0, 3)) else st.sampled_from(seeds))
    data = bytearray(chosen.data)
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        data = draw(st.sampled_from(MUTATIONS))(draw, data, chosen)
    if data.startswith(b"\x89PNG") and draw(st.booleans()):
        data = fix_png_crcs(data)
    return chosen.name, bytes(data)


# ---------------------------------------------------------------- the property


class Finding(AssertionError):
    """The decode or metadata path broke its contract on an input."""


def check(path: Path, *, max_pixels: int, scratch: Path) -> str:
    """Decode `path` (and, if it decodes, stamp, encode and decode the output); return the
    outcome ("decoded" or the refusing ImageError's class name), or raise Finding."""
    try:
        image = decode(path, max_pixels=max_pixels)
    except ImageError as exc:
        if not str(exc).startswith(str(path)) or exc.path != path:
            raise Finding(f"{type(exc).__name__} does not name the file: {exc}") from exc
        return type(exc).__name__
    except Exception as exc:
        raise Finding(f"decode raised {type(exc).__name__}: {exc}") from exc
    _check_image(image)
    if image.width * image.height <= ENCODE_LIMIT:
        _round_trip(image, scratch)
    return "decoded"


def _check_image(image: Any) -> None:
    pixels, alpha = image.pixels, image.alpha
    problems = []
    if pixels.dtype != np.float32 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        problems.append(f"pixels {pixels.dtype} {pixels.shape}")
    elif 0 in pixels.shape or not (np.all(pixels >= 0) and np.all(pixels <= 1)):
        problems.append("pixels empty, NaN or outside [0, 1]")
    if alpha is not None and (alpha.shape != pixels.shape[:2] or alpha.dtype != np.float32):
        problems.append(f"alpha {alpha.dtype} {alpha.shape}")
    if image.bit_depth not in (8, 16) or image.format not in FORMATS:
        problems.append(f"depth {image.bit_depth}, format {image.format}")
    if problems:
        raise Finding("decode returned an invalid Image: " + "; ".join(problems))


def _round_trip(image: Any, scratch: Path) -> None:
    """What a worker does with a decoded scan, less the model: stamp, encode, read back."""
    metadata = stamp(
        image.metadata,
        software="scanrestore fuzz",
        properties={"RunId": "0" * 16, "RecipeSHA256": "0" * 64},
        stages=["upscale v1 fuzz"],
    )
    output = scratch / f"out{suffix_for(image.format)}"
    try:
        encode(image.replace(metadata=metadata), output)
    except EncodeError:
        return  # a refusal that names the file is within the contract
    except Exception as exc:
        raise Finding(f"encode raised {type(exc).__name__}: {exc}") from exc
    try:
        again = decode(output)
    except Exception as exc:
        raise Finding(f"our own output does not decode: {type(exc).__name__}: {exc}") from exc
    if (again.width, again.height) != (image.width, image.height):
        raise Finding(f"output is {again.width}x{again.height}, not {image.width}x{image.height}")


# ---------------------------------------------------------------- the long run


@dataclass
class Tally:
    examples: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)
    current: tuple[str, bytes] | None = None
    started: float = 0.0
    last_failure: tuple[str, bytes, str] | None = None


def _run_batch(
    tally: Tally, seeds: list[Seed], batch_seed: int, examples: int, max_pixels: int, work: Path
) -> None:
    @seed(batch_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutated(seeds))
    def batch(case: tuple[str, bytes]) -> None:
        name, data = case
        path = work / f"input-{name}"  # named for its seed: a supervisor can say which crashed
        path.write_bytes(data)
        tally.current, tally.started = case, time.monotonic()
        try:
            tally.outcomes[check(path, max_pixels=max_pixels, scratch=work)] += 1
        except Finding as exc:
            tally.last_failure = (name, data, f"{exc}\n{traceback.format_exc()}")
            raise
        finally:
            tally.current = None
            tally.examples += 1

    batch()


def _record(tally: Tally, exc: BaseException, findings_dir: Path) -> None:
    if tally.last_failure is None:  # not a Finding: a bug in the harness itself
        raise exc
    name, data, detail = tally.last_failure
    key = detail.splitlines()[0][:160]
    if key in tally.findings:
        tally.findings[key]["times"] += 1
        return
    findings_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:16]
    saved = findings_dir / f"{digest}{Path(name).suffix.lower()}"
    saved.write_bytes(data)
    tally.findings[key] = {"seed": name, "input": str(saved), "detail": detail, "times": 1}


def _watch_for_hangs(tally: Tally, limit: float, findings_dir: Path, stop: threading.Event):
    """An example stuck in native code cannot be interrupted: save it, report, exit."""
    while not stop.wait(1.0):
        case = tally.current
        if case is not None and time.monotonic() - tally.started > limit:
            findings_dir.mkdir(parents=True, exist_ok=True)
            name, data = case
            saved = findings_dir / f"hang-{hashlib.sha256(data).hexdigest()[:16]}"
            saved.write_bytes(data)
            sys.stderr.write(f"HANG: seed {name}, input saved to {saved}\n")
            sys.stderr.flush()
            os._exit(3)


def run(
    seconds: float,
    work: Path,
    *,
    base_seed: int = 0,
    batch: int = 200,
    max_pixels: int = 16_000_000,
    hang_seconds: float = 60.0,
    findings_dir: Path = FINDINGS,
) -> dict[str, Any]:
    """Batches in this process until `seconds` have passed; after each batch the counts so far
    are written to `work`/progress.json (all a supervisor has left if the process dies)."""
    seeds = load_seeds()
    tally = Tally()
    stop = threading.Event()
    watchdog = threading.Thread(
        target=_watch_for_hangs, args=(tally, hang_seconds, findings_dir, stop), daemon=True
    )
    watchdog.start()
    started, batches = time.monotonic(), 0
    try:
        while time.monotonic() - started < seconds:
            tally.last_failure = None
            try:
                _run_batch(tally, seeds, base_seed + batches, batch, max_pixels, work)
            except Exception as exc:
                _record(tally, exc, findings_dir)
            batches += 1
            (work / "progress.json").write_text(json.dumps(_counts(tally, batches)))
    finally:
        stop.set()
        watchdog.join()
    return {
        "seconds": round(time.monotonic() - started, 1),
        "seeds": len(seeds),
        **_counts(tally, batches),
    }


def _counts(tally: Tally, batches: int) -> dict[str, Any]:
    return {
        "batches": batches,
        "examples": tally.examples,
        "outcomes": dict(tally.outcomes.most_common()),
        "findings": list(tally.findings.values()),
    }


def supervise(
    seconds: float,
    *,
    base_seed: int = 0,
    batch: int = 200,
    max_pixels: int = 16_000_000,
    hang_seconds: float = 60.0,
    findings_dir: Path = FINDINGS,
) -> dict[str, Any]:
    """`run` in child processes until `seconds` have passed. A child killed by a signal (a
    decoder's segfault) leaves its last input behind: that is saved as a finding and a new
    child goes on from the next batch seed; so does a child that stopped on a hang."""
    started = time.monotonic()
    totals: dict[str, Any] = {"batches": 0, "examples": 0, "outcomes": Counter(), "findings": []}
    batch_seed, children = base_seed, 0
    with tempfile.TemporaryDirectory(prefix="scanrestore-fuzz-") as state:
        while (left := seconds - (time.monotonic() - started)) > 1:
            work = Path(state) / f"child-{children}"
            work.mkdir()
            command = [sys.executable, __file__, "--child", str(work), f"--seconds={left:.1f}"]
            command += [f"--seed={batch_seed}", f"--batch={batch}", f"--max-pixels={max_pixels}"]
            command += [f"--hang-seconds={hang_seconds}", f"--findings={findings_dir}"]
            child = subprocess.run(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            children += 1
            progress = work / "progress.json"
            done = json.loads(progress.read_text()) if progress.exists() else _counts(Tally(), 0)
            totals["batches"] += done["batches"]
            totals["examples"] += done["examples"]
            totals["outcomes"].update(done["outcomes"])
            totals["findings"] += done["findings"]
            if child.returncode not in (0, 1):  # 1: findings, all in its progress
                totals["findings"].append(_death(child, work, findings_dir))
                totals["batches"] += 1  # the batch it died in
            batch_seed = base_seed + totals["batches"]
    return {
        "seconds": round(time.monotonic() - started, 1),
        "seeds": len(load_seeds()),
        "children": children,
        **totals,
        "outcomes": dict(totals["outcomes"].most_common()),
    }


def _death(child: subprocess.CompletedProcess[str], work: Path, findings_dir: Path) -> dict:
    """The finding for a child that died (a signal) or gave up on a hang (exit 3)."""
    inputs = sorted(work.glob("input-*"), key=lambda p: p.stat().st_mtime_ns)
    code = child.returncode
    what = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    if code == 3:
        what = "an example hung (see its saved input)"
    finding = {"seed": None, "input": None, "detail": f"the fuzzing process died: {what}"}
    if inputs:
        data = inputs[-1].read_bytes()
        findings_dir.mkdir(parents=True, exist_ok=True)
        saved = findings_dir / f"crash-{hashlib.sha256(data).hexdigest()[:16]}"
        saved = saved.with_suffix(Path(inputs[-1].name).suffix.lower())
        saved.write_bytes(data)
        finding |= {"seed": inputs[-1].name.removeprefix("input-"), "input": str(saved)}
    finding["detail"] += "\n" + (child.stderr or "")[-2000:]
    finding["times"] = 1
    return finding


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0, help="first batch's Hypothesis seed")
    parser.add_argument("--batch", type=int, default=200, help="examples per batch")
    parser.add_argument("--max-pixels", type=int, default=16_000_000)
    parser.add_argument("--hang-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fuzz.json")
    parser.add_argument("--findings", type=Path, default=FINDINGS, help=argparse.SUPPRESS)
    parser.add_argument("--child", type=Path, metavar="WORK", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # tifffile and the decoder log every input
    warnings.simplefilter("ignore")  # ... and Pillow warns
    if not load_seeds():
        print(f"no seeds: {CORPUS} is absent", file=sys.stderr)
        return 2
    options = {
        "base_seed": args.seed,
        "batch": args.batch,
        "max_pixels": args.max_pixels,
        "hang_seconds": args.hang_seconds,
        "findings_dir": args.findings,
    }
    if args.child is not None:  # one supervised child: its progress file is its report
        return 1 if run(args.seconds, args.child, **options)["findings"] else 0
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    report = {"started_at": started_at, **supervise(args.seconds, **options)}
    report |= {"max_pixels": args.max_pixels, "base_seed": args.seed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{report['examples']} examples in {report['seconds']} s over {report['seeds']} seeds: "
        f"{len(report['findings'])} findings; outcomes {report['outcomes']}"
    )
    for finding in report["findings"]:
        print(f"FINDING ({finding['times']}x, seed {finding['seed']}): {finding['input']}")
        print("  " + finding["detail"].splitlines()[0])
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
