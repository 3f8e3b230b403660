"""Hostile inputs through the real daemon (`scanrestore watch --once` as a process).

Every file of the shared corpus's hostile_inputs, plus files made here: headers declaring huge
sizes (PNG, TIFF, JPEG), EXIF blocks with absurd counts, offsets, loops and fan-out, ICC
profiles of megabytes, images of 1x1 and 60000x1 pixels, and odd file names (bytes that are not
UTF-8, newlines, terminal escapes, leading dashes, long names, NFC/NFD twins). Each must end
processed correctly or quarantined with a reason naming it, within a memory bound, and the log
must never carry a raw control character out of a file name. One daemon run serves every test.
"""

from __future__ import annotations

import io
import os
import re
import sqlite3
import struct
import subprocess
import sys
import time
import unicodedata
import zlib
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
from conftest import CORPUS, shared_file
from modelfactory import nearest_compact
from PIL import Image as PILImage
from PIL import ImageCms
from test_daemon import Site

from pipeline.image import decode

REPO = Path(__file__).resolve().parents[1]
MEMORY_BOUND = int(2.5 * 2**30)  # daemon + worker together, resident (PSS)
RUN_TIMEOUT = 600  # a hang is a failure, not a stuck CI job


# ---------------------------------------------------------------- making hostile files


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, rows: bytes = b"\0" * 8) -> bytes:
    """An 8-bit RGB PNG with this header, whatever `rows` (filtered scanlines) really hold."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def tiff(width: int, height: int, data: bytes = b"\0" * 16, extra: tuple[tuple, ...] = ()) -> bytes:
    """A little-endian greyscale TIFF, one uncompressed strip, declaring this size; `extra`
    (tag, type, count, value) entries follow the image's own."""
    tags = [
        (256, 4, 1, width),  # ImageWidth
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # PhotometricInterpretation: min-is-black
        (273, 4, 1, 0),  # StripOffsets: patched below
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, len(data)),  # StripByteCounts
        *extra,
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    data_at = 8 + ifd_size
    body = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        value = data_at if tag == 273 else value
        body += struct.pack("<HHI", tag, kind, count) + struct.pack("<I", value)
    return b"II*\0" + struct.pack("<I", 8) + body + struct.pack("<I", 0) + data


def small_jpeg(side: int = 32, **save: object) -> bytes:
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real 32x32 JPEG whose frame header is rewritten to declare another size."""
    data = bytearray(small_jpeg())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def exif_jpeg(tiff_block: bytes) -> bytes:
    """A real JPEG with `tiff_block` as its EXIF (APP1) segment."""
    body = b"Exif\0\0" + tiff_block
    assert len(body) + 2 < 65536
    data = small_jpeg()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + data[2:]


def ifd(entries: list[tuple[int, int, int, int]], next_ifd: int = 0) -> bytes:
    """A little-endian IFD: (tag, type, count, value-or-offset) entries."""
    out = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack("<HHII", tag, kind, count, value)
    return out + struct.pack("<I", next_ifd)


def exif_count_past_the_end() -> bytes:
    return b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 0xFFFF) + b"\0" * 24


def exif_value_far_outside() -> bytes:
    # 2**30 LONGs at an offset near 4 GiB: a reader that trusts them allocates gigabytes.
    return b"II*\0" + struct.pack("<I", 8) + ifd([(0x010F, 4, 0x3FFFFFFF, 0xFFFFFF00)])


def exif_first_directory_outside() -> bytes:
    return b"II*\0" + struct.pack("<I", 0xFFFFFFF0) + b"\0" * 16


def exif_loop() -> bytes:
    # IFD0's Exif pointer points at IFD0 again, and its next-IFD pointer too.
    return b"II*\0" + struct.pack("<I", 8) + ifd([(0x8769, 4, 1, 8)], next_ifd=8)


def exif_fan_out(width: int = 1600) -> bytes:
    """Three directories of `width` Exif pointers each, every one to the next directory: a
    parser following each pointer reads width**3 entries (billions), one that refuses a
    directory reached twice reads a few thousand."""
    size = 2 + 12 * width + 4
    first, second, third, last = 8, 8 + size, 8 + 2 * size, 8 + 3 * size
    block = b"II*\0" + struct.pack("<I", first)
    for target in (second, third, last):
        block += ifd([(0x8769, 4, 1, target)] * width)
    return block + ifd([])


def big_icc(size: int) -> bytes:
    """An sRGB profile padded to `size` bytes, its header's size field updated to match."""
    base = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile = base + bytes(size - len(base))
    struct.pack_into(">I", profile, 0, size)
    return bytes(profile)


def with_icc(fmt: str, profile: bytes) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, fmt, icc_profile=profile)
    return buffer.getvalue()


def photo_crop(index: int) -> bytes:
    """A small real photo, different for each index (so no two are the same bytes)."""
    bird = cv2.imread(str(shared_file("corpus/sr_benchmark/Set5/HR/bird.png")))
    crop = bird[index * 8 : index * 8 + 40, index * 8 : index * 8 + 40]
    return cv2.imencode(".png", crop)[1].tobytes()


def rows_of(width: int, height: int) -> bytes:
    """Filter-type-0 scanlines of a grey ramp, as a PNG's IDAT holds them."""
    row = bytes(np.arange(width * 3, dtype=np.uint64) % 251)
    return (b"\0" + row) * height


# ---------------------------------------------------------------- what each must become


@dataclass(frozen=True)
class Case:
    name: bytes  # the file name as raw bytes: some are not UTF-8
    data: bytes
    outcome: str  # "done" or "quarantined"
    reason: str = ""  # words the quarantine reason must hold
    check: Callable[[Path, Path], None] | None = None  # (source, output) for a done case


def _same_size_times_two(source: Path, output: Path) -> None:
    before, after = decode(source), decode(output)
    assert (after.width, after.height) == (2 * before.width, 2 * before.height)


def _icc_carried(source: Path, output: Path) -> None:
    assert decode(output).metadata.icc_profile == decode(source).metadata.icc_profile
    _same_size_times_two(source, output)


NFC = unicodedata.normalize("NFC", "café").encode()
NFD = unicodedata.normalize("NFD", "café").encode()
LONG = b"n" * 240  # with ".v1.mask.png" still a legal name, but not with a temporary suffix

CASES = [
    Case(b"png-declares-10-gigapixels.png", png(100_000, 100_000), "quarantined", "limit"),
    Case(b"png-declares-196-megapixels.png", png(14_000, 14_000), "quarantined", "damaged"),
    Case(b"tiff-declares-10-gigapixels.tif", tiff(100_000, 100_000), "quarantined", "limit"),
    Case(b"tiff-declares-196-megapixels.tif", tiff(14_000, 14_000), "quarantined", ""),
    Case(b"jpeg-declares-4-gigapixels.jpg", jpeg_declaring(65_000, 65_000), "quarantined", "limit"),
    Case(b"jpeg-declares-196-megapixels.jpg", jpeg_declaring(14_000, 14_000), "quarantined", ""),
    Case(b"exif-count-past-the-end.jpg", exif_jpeg(exif_count_past_the_end()), "quarantined"),
    Case(
        b"exif-value-far-outside.jpg",
        exif_jpeg(exif_value_far_outside()),
        "done",  # the entry whose value is not there is dropped, the image is fine
        check=_same_size_times_two,
    ),
    Case(b"exif-first-ifd-outside.jpg", exif_jpeg(exif_first_directory_outside()), "quarantined"),
    Case(b"exif-loop.jpg", exif_jpeg(exif_loop()), "quarantined", "EXIF"),
    Case(b"exif-fan-out.jpg", exif_jpeg(exif_fan_out()), "quarantined", "EXIF"),
    Case(b"icc-6mb.png", with_icc("PNG", big_icc(6 << 20)), "done", check=_icc_carried),
    Case(b"icc-3mb.jpg", with_icc("JPEG", big_icc(3 << 20)), "done", check=_icc_carried),
    Case(b"one-pixel-png.png", png(1, 1, b"\0\x10\x20\x30"), "done", check=_same_size_times_two),
    Case(b"one-pixel-jpeg.jpg", small_jpeg(1), "done", check=_same_size_times_two),
    Case(
        b"wide-60000x1.png", png(60_000, 1, rows_of(60_000, 1)), "done", check=_same_size_times_two
    ),
    Case(
        b"tall-1x60000.png", png(1, 60_000, rows_of(1, 60_000)), "done", check=_same_size_times_two
    ),
    Case(b"scan-\xff\xfe-latin1.png", photo_crop(1), "done", check=_same_size_times_two),
    Case(b"line\nbreak.png", photo_crop(2), "done", check=_same_size_times_two),
    Case(b"escape-\x1b[31mred\x07.png", photo_crop(3), "done", check=_same_size_times_two),
    Case(b"damaged-\x1b[2J-\n.png", png(64, 64), "quarantined", "damaged"),  # logged as failed
    Case(  # decodes, with a warning (its EXIF is not carried) that quotes the name
        b"warned\nname.tif",
        tiff(8, 8, bytes(range(64)), extra=((34665, 4, 1, 0x7FFFFFF0),)),
        "done",
        check=_same_size_times_two,
    ),
    Case(b"-rf.png", photo_crop(4), "done", check=_same_size_times_two),
    Case(b"--help.png", photo_crop(5), "done", check=_same_size_times_two),
    Case(LONG + b".png", photo_crop(6), "done", check=_same_size_times_two),
    Case(b"m" * 251 + b".png", photo_crop(7), "quarantined", "too long"),
    Case(NFC + b".png", photo_crop(8), "done", check=_same_size_times_two),
    Case(NFD + b".png", photo_crop(9), "done", check=_same_size_times_two),
]


# ---------------------------------------------------------------- one daemon run


@dataclass
class Run:
    site: Site
    returncode: int
    log: str
    peak_rss: int
    states: dict[bytes, tuple[str, str | None]]  # file name -> (job state, last error)


def _measure(process: subprocess.Popen) -> int:
    """Peak resident memory of `process` and its children together, sampled until it exits.
    Each process counts its proportional set size: RSS with every shared page divided among
    the processes sharing it, so the libraries daemon and worker both map count once."""
    root = psutil.Process(process.pid)
    peak = 0
    deadline = time.monotonic() + RUN_TIMEOUT
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the daemon did not finish in {RUN_TIMEOUT} s (a hang?)")
        total = 0
        for member in [root, *root.children(recursive=True)]:
            try:
                info = member.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except psutil.Error:
                pass  # it ended between the listing and the reading
        peak = max(peak, total)
        time.sleep(0.02)
    return peak


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("hostile")
    model = nearest_compact(root / "model" / "nearest2x.pth", scale=2)
    site = Site(root, model, watch={"stable_seconds": 0.3}, daemon={"provenance_sidecar": False})
    for path in sorted((CORPUS / "hostile_inputs").iterdir()) if CORPUS.is_dir() else []:
        (site.scans / path.name).write_bytes(path.read_bytes())
    scans = os.fsencode(site.scans)
    for case in CASES:
        with open(os.path.join(scans, case.name), "wb") as handle:
            handle.write(case.data)
    log = root / "daemon.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(site.config), "-v", "watch", "--once"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        peak = _measure(process)
    with closing(sqlite3.connect(site.state / "scanrestore.db")) as db:
        states = {
            os.fsencode(path) if isinstance(path, str) else path: (state, error)
            for path, state, error in db.execute("SELECT path, state, last_error FROM jobs")
        }
    return Run(site, process.returncode, log.read_bytes().decode(errors="replace"), peak, states)


def _outputs(run: Run, name: bytes) -> list[Path]:
    """The published images of the source `name` (its sidecars left out)."""
    stem = name.rsplit(b".", 1)[0]
    out = os.fsencode(run.site.out)
    return [
        Path(os.fsdecode(os.path.join(out, entry)))
        for entry in os.listdir(out)
        if entry.startswith(stem + b".v") and not entry.endswith((b".json", b".mask.png"))
    ]


# ---------------------------------------------------------------- the tests


def test_the_run_ends_reporting_failures_without_dying(run):
    assert run.returncode == 1, run.log[-3000:]  # 1: some files failed; not a crash
    assert "Traceback" not in run.log, run.log


def test_every_corpus_hostile_file_is_quarantined_with_a_reason_naming_it_or_waits(run):
    hostile = sorted((CORPUS / "hostile_inputs").iterdir()) if CORPUS.is_dir() else []
    if not hostile:
        shared_file("corpus/hostile_inputs")  # skips without ../shared, fails if it is missing
    assert hostile, "corpus/hostile_inputs is empty"
    for path in hostile:
        name = path.name.encode()
        if path.stat().st_size == 0:
            assert name not in run.states  # an empty placeholder is never taken
            continue
        state, error = run.states[name]
        assert state == "quarantined", (path.name, state, error)
        assert error.startswith(str(run.site.scans / path.name)), error


@pytest.mark.parametrize("case", CASES, ids=[os.fsdecode(c.name)[:40] for c in CASES])
def test_each_generated_hostile_file_is_processed_correctly_or_quarantined(run, case):
    state, error = run.states[case.name]
    assert state == case.outcome, (state, error)
    source = Path(os.fsdecode(os.path.join(os.fsencode(run.site.scans), case.name)))
    if case.outcome == "quarantined":
        assert error.startswith(str(source)) and case.reason in error, error
        assert _outputs(run, case.name) == []
    else:
        (output,) = _outputs(run, case.name)
        assert output.name.endswith(".v1" + source.suffix)
        if case.check is not None:
            case.check(source, output)


def test_nfc_and_nfd_twins_stay_two_files_with_two_outputs(run):
    names = sorted(os.listdir(os.fsencode(run.site.out)))
    assert NFC + b".v1.png" in names and NFD + b".v1.png" in names


def test_the_daemon_and_its_worker_stay_under_the_memory_bound(run):
    assert 0 < run.peak_rss < MEMORY_BOUND, f"peak {run.peak_rss / 2**30:.2f} GiB"


def test_log_lines_escape_control_characters_in_file_names(run):
    lines = run.log.splitlines()
    after_newline = ("break.png", "name.tif", ".png")  # what would follow a raw newline
    assert not [line for line in lines if line.startswith(after_newline)]
    assert re.search(r"warned\\nname\.tif: EXIF/GPS directory unreadable", run.log)
    assert "\x1b" not in run.log and "\x07" not in run.log
    assert re.search(r'path="line\\nbreak\.png"', run.log)
    assert re.search(r'path="escape-\\x1b\[31mred\\x07\.png"', run.log)
    assert re.search(r'path="scan-\\xff\\xfe-latin1\.png"', run.log)
    assert re.search(r'failed path="damaged-\\x1b\[2J-\\n\.png" error=\S*damaged-\\x1b', run.log)
