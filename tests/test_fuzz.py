"""A time-boxed fuzz of the decode and metadata path: bench/fuzz.py's mutations of real corpus
files (bit flips, truncation, length/count/offset/dimension fields set to edge values, bytes
inserted, deleted or repeated) through its property: decode returns a valid Image or an
ImageError naming the file, never another exception; a decoded image stamps, encodes and reads
back. 1500 examples, derandomised, so CI is short and repeatable; `bench/fuzz.py
--seconds N` runs the same strategies for as long as one likes.
"""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings

from pipeline.errors import DecodeError
from pipeline.image import decode, encode


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fuzz = _load("bench_fuzz", REPO / "bench" / "fuzz.py")
SEEDS = fuzz.load_seeds()

pytestmark = pytest.mark.skipif(
    not SEEDS, reason=f"{fuzz.CORPUS} (the shared corpus the fuzzer mutates) is absent"
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.timeout(600)  # a hang fails the test instead of stalling CI
@settings(
    max_examples=1500,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=fuzz.mutated(SEEDS))
def test_mutated_corpus_files_decode_validly_or_are_refused_naming_the_file(case, scratch):
    name, data = case
    path = scratch / f"input{Path(name).suffix.lower()}"
    path.write_bytes(data)
    outcome = fuzz.check(path, max_pixels=16_000_000, scratch=scratch)
    assert outcome == "decoded" or outcome.endswith("Error")


def test_the_seeds_cover_every_format_and_most_decode():
    suffixes = {Path(seed.name).suffix.lower() for seed in SEEDS if seed.decodes}
    assert {".jpg", ".png", ".webp"} <= suffixes and suffixes & {".tif", ".tiff"}
    assert sum(seed.decodes for seed in SEEDS) >= len(SEEDS) // 3


def test_structural_fields_point_at_the_lengths_they_name():
    seed = next(s for s in SEEDS if s.name.endswith(".png") and s.decodes)
    first = seed.fields[0]  # IHDR's length: 13, big-endian, at byte 8
    assert (first.position, first.width, first.order) == (8, 4, "big")
    assert int.from_bytes(seed.data[8:12], "big") == 13
    jpeg = next(s for s in SEEDS if s.name.endswith(".jpg") and s.decodes)
    for field in jpeg.fields[:3]:  # segment lengths follow their 0xFFxx markers
        assert jpeg.data[field.position - 2] == 0xFF
    assert any(f.width == 2 for f in jpeg.fields) and any(f.width == 4 for f in jpeg.fields)


def test_png_crcs_are_recomputed_so_mutations_reach_past_the_check():
    seed = next(s for s in SEEDS if s.name.endswith(".png") and s.decodes)
    data = bytearray(seed.data)
    data[16] ^= 0x01  # inside IHDR's width
    repaired = fuzz.fix_png_crcs(bytearray(data))
    (crc,) = struct.unpack_from(">I", repaired, 8 + 8 + 13)
    assert crc == fuzz.zlib.crc32(bytes(repaired[12 : 8 + 8 + 13])) and repaired != seed.data


def test_the_property_reports_an_exception_that_is_not_an_image_error(monkeypatch, scratch):
    def broken(path, **_):
        raise IndexError("list index out of range")

    monkeypatch.setattr(fuzz, "decode", broken)
    with pytest.raises(fuzz.Finding, match="IndexError"):
        fuzz.check(scratch / "x.png", max_pixels=100, scratch=scratch)


def test_the_property_reports_a_refusal_that_does_not_name_the_file(monkeypatch, scratch):
    def vague(path, **_):
        raise DecodeError("somewhere/else.png", "damaged")

    monkeypatch.setattr(fuzz, "decode", vague)
    with pytest.raises(fuzz.Finding, match="does not name the file"):
        fuzz.check(scratch / "x.png", max_pixels=100, scratch=scratch)


def test_the_bench_runs_supervised_batches_and_reports_examples_and_findings(tmp_path):
    report = fuzz.supervise(4.0, batch=20, findings_dir=tmp_path / "findings")
    assert report["children"] == 1 and report["batches"] >= 1
    assert report["examples"] >= 20 and sum(report["outcomes"].values()) == report["examples"]
    assert report["findings"] == []


def test_a_child_killed_by_a_signal_becomes_a_finding_with_its_last_input(tmp_path):
    work = tmp_path / "child"
    work.mkdir()
    (work / "input-a.png").write_bytes(b"older")
    (work / "input-b.tif").write_bytes(b"the input it died on")
    died = subprocess.CompletedProcess([], -11, stderr="Fatal Python error: Segmentation fault")
    finding = fuzz._death(died, work, tmp_path / "findings")
    assert finding["seed"] == "b.tif" and "signal 11" in finding["detail"]
    assert Path(finding["input"]).read_bytes() == b"the input it died on"
    assert "Segmentation fault" in finding["detail"]


# ---------------------------------------------------------------- what the long run found


def test_a_damaged_thumbnail_offset_does_not_blank_the_exif_of_the_output(tmp_path):
    """bench/fuzz.py, 660 s, seed 7: IFD1's JPEGInterchangeFormat set to 1 made the encoder
    blank 1322 bytes from offset 1, the TIFF header and IFD0 included; the output's EXIF was
    unreadable (every tag of the photo lost) and the output refused by our own decoder."""
    seed = next(s for s in SEEDS if s.name == "exifsamples_long_description.jpg")
    data = bytearray(seed.data)
    entry = data.find(b"\x02\x01\x00\x04\x00\x00\x00\x01")  # MM: tag 0x0201, LONG, count 1
    assert entry > 0
    data[entry + 8 : entry + 12] = (1).to_bytes(4, "big")
    source = tmp_path / "thumbnail-offset-1.jpg"
    source.write_bytes(bytes(data))
    output = tmp_path / "out.jpg"
    image = decode(source)
    encode(image, output)
    again = decode(output)
    assert again.metadata.exif.startswith(b"MM\0*")
    description = next(e for e in _ifd0(again.metadata.exif) if e.tag == 0x010E)
    assert description.data == next(e for e in _ifd0(image.metadata.exif) if e.tag == 0x010E).data


def _ifd0(exif: bytes):
    from pipeline.image.directory import read_header, read_ifd

    layout = read_header(exif)
    return read_ifd(exif, layout.first_ifd, layout)[0]


def test_a_corrupt_lzw_strip_is_refused_not_a_crash(tmp_path):
    """bench/fuzz.py, 660 s, seed 1000: seven bytes changed in an LZW TIFF made imagecodecs,
    told the strip's size by tifffile, write past its buffer: a segfault in most runs, which in
    the daemon kills the worker. Decoded in a child process, five times, as a crash would end
    pytest too."""
    seed = next(s for s in SEEDS if s.name == "exifsamples_DudleyLeavittUtah.tiff")
    data = bytearray(seed.data)
    changes = ((9, 127), (355, 248), (653, 219), (1667, 144), (4136, 231), (13434, 5))
    for at, value in (*changes, (32181, 182)):
        data[at] = value
    path = tmp_path / "corrupt-lzw.tiff"
    path.write_bytes(bytes(data))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pipeline.errors import DecodeError\n"
        "from pipeline.image import decode\n"
        "for _ in range(5):\n"
        "    try:\n"
        "        decode(Path(sys.argv[1]))\n"
        "    except DecodeError as exc:\n"
        "        print(exc)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr[-2000:]
    lines = child.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith(str(path)) and "LZW" in line for line in lines)
