"""IPTC DigitalSourceType and the licence policy: what the stages earn, how the stamp carries it
beside the source's own XMP (read back by exiftool, an independent reader), and a chain with a
model under a licence outside models.allowed_licences refused before any image."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import shared_file
from modelfactory import tiny_compact

from daemon.cli import main
from pipeline.image import Metadata
from pipeline.sourcetype import (
    ALGORITHMICALLY_ENHANCED,
    COMPOSITE_WITH_TRAINED,
    NEWSCODES,
    digital_source_type,
    models_used,
    source_type_uri,
    with_licences,
)
from pipeline.stamp import Disclosure, source_digital_source_type, stamp

SHA = "ab" * 32
NLM = {"stage": "denoise", "version": 1, "params": {"method": "nlm", "h": 5.0}, "skipped": None}
UPSCALE = {
    "stage": "upscale",
    "version": 1,
    "params": {"model": "realesrgan-x2plus", "model_sha256": SHA, "scale": 2.0},
    "skipped": None,
}
LAMA = {
    "stage": "restore",
    "version": 1,
    "params": {
        "dust": {"inpaint": "model", "inpaint_model": "big-lama", "inpaint_model_sha256": SHA}
    },
    "skipped": None,
}
NO_FACES = {
    "stage": "face",
    "version": 1,
    "params": {"model": "gfpgan-1.4", "model_sha256": SHA, "detector": "d", "detector_sha256": SHA},
    "skipped": "no faces found",
}


def test_a_trained_model_that_made_pixels_makes_a_composite_with_trained_media():
    assert digital_source_type([NLM, UPSCALE]) == COMPOSITE_WITH_TRAINED
    assert digital_source_type([LAMA]) == COMPOSITE_WITH_TRAINED  # nested: the dust repair
    assert COMPOSITE_WITH_TRAINED.endswith("/compositeWithTrainedAlgorithmicMedia")


def test_classical_steps_only_are_algorithmically_enhanced_never_trained_media():
    assert digital_source_type([NLM]) == ALGORITHMICALLY_ENHANCED
    # a face stage that found no face ran its detector but made no pixels
    assert digital_source_type([NLM, NO_FACES]) == ALGORITHMICALLY_ENHANCED
    assert digital_source_type([NO_FACES]) is None
    for chain in ([NLM], [UPSCALE], [LAMA], [NLM, NO_FACES]):
        assert digital_source_type(chain) != NEWSCODES + "trainedAlgorithmicMedia"


def test_every_model_is_listed_with_its_licence_and_whether_it_made_pixels():
    licensed = with_licences([UPSCALE, NO_FACES], {"realesrgan-x2plus": "BSD-3-Clause", "d": "MIT"})
    assert licensed[0]["params"]["model_licence"] == "BSD-3-Clause"
    assert licensed[1]["params"]["model_licence"] == "unknown"  # not in the map
    uses = [(u.stage, u.id, u.made_pixels, u.licence) for u in models_used(licensed)]
    assert uses == [
        ("upscale", "realesrgan-x2plus", True, "BSD-3-Clause"),
        ("face", "gfpgan-1.4", False, "unknown"),
        ("face", "d", False, "MIT"),
    ]


def test_a_source_type_is_a_code_of_the_vocabulary():
    assert source_type_uri("print") == NEWSCODES + "print"
    assert source_type_uri(NEWSCODES + "negativeFilm") == NEWSCODES + "negativeFilm"
    with pytest.raises(ValueError, match="not an IPTC digital source type"):
        source_type_uri("photocopy")


SOURCE_XMP = (
    b"<?xpacket begin='\xef\xbb\xbf' id='W5M0MpCehiHzreSzNTczkc9d'?>\n"
    b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF "
    b"xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>\n"
    b"<rdf:Description rdf:about='' xmlns:Iptc4xmpExt='http://iptc.org/std/Iptc4xmpExt/2008-02-29/'"
    b" Iptc4xmpExt:DigitalSourceType='http://cv.iptc.org/newscodes/digitalsourcetype/print'/>\n"
    b"<rdf:Description rdf:about='' xmlns:dc='http://purl.org/dc/elements/1.1/'>"
    b"<dc:title><rdf:Alt><rdf:li xml:lang='x-default'>Grandmother, 1931</rdf:li></rdf:Alt>"
    b"</dc:title></rdf:Description>\n</rdf:RDF></x:xmpmeta>\n<?xpacket end='w'?>"
)


def test_the_sources_own_type_moves_to_source_digital_source_type_and_its_xmp_stays():
    disclosure = Disclosure(COMPOSITE_WITH_TRAINED, default_source_type=NEWSCODES + "negativeFilm")
    stamped = stamp(Metadata(xmp=SOURCE_XMP), software="s", properties={}, disclosure=disclosure)
    xmp = stamped.xmp
    assert b"Grandmother, 1931" in xmp  # the source's own description is kept
    assert xmp.count(b"DigitalSourceType=") == 0  # the attribute form is gone, not duplicated
    assert (
        b"<Iptc4xmpExt:DigitalSourceType>" + COMPOSITE_WITH_TRAINED.encode() in xmp
    )  # the output's own
    # the source's own type wins over the collection's default, and survives a second stamp
    assert source_digital_source_type(xmp) == NEWSCODES + "print"
    again = stamp(stamped, software="s", properties={}, disclosure=disclosure)
    assert source_digital_source_type(again.xmp) == NEWSCODES + "print"
    assert again.xmp.count(b"<Iptc4xmpExt:DigitalSourceType>") == 1


def test_an_output_no_stage_changed_keeps_the_sources_type():
    unchanged = Disclosure(None, default_source_type=NEWSCODES + "negativeFilm")
    stamped = stamp(Metadata(xmp=SOURCE_XMP), software="s", properties={}, disclosure=unchanged)
    assert f"<Iptc4xmpExt:DigitalSourceType>{NEWSCODES}print<".encode() in stamped.xmp
    unknown = stamp(Metadata(), software="s", properties={}, disclosure=Disclosure(None))
    assert b"DigitalSourceType" not in unknown.xmp  # nothing is claimed that is not known


def test_the_collections_source_type_is_recorded_where_the_scan_states_none():
    disclosure = Disclosure(ALGORITHMICALLY_ENHANCED, default_source_type=NEWSCODES + "print")
    stamped = stamp(Metadata(), software="s", properties={}, disclosure=disclosure)
    assert f"<scanrestore:SourceDigitalSourceType>{NEWSCODES}print<".encode() in stamped.xmp
    assert source_digital_source_type(stamped.xmp) == NEWSCODES + "print"


# ------------------------------------------------------------------ end to end, read by exiftool


def _exiftool() -> str:
    found = shutil.which("exiftool")
    if found is None:
        pytest.skip("exiftool is not installed (Debian libimage-exiftool-perl; scripts/setup)")
    return found


def _read_xmp(exiftool: str, path: Path) -> dict:
    out = subprocess.run(
        [exiftool, "-j", "-G1", "-u", "-XMP:all", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)[0]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("SCANRESTORE_CACHE_DIR", str(path))
    return path


@pytest.fixture
def scan(tmp_path) -> Path:
    """A real corpus photograph, copied to tmp_path with XMP written by exiftool: a title and
    the scan's own DigitalSourceType (negativeFilm)."""
    exiftool = _exiftool()
    path = tmp_path / "scan.png"
    shutil.copy(shared_file("corpus/sr_benchmark/Set5/LR_bicubic_X4/babyx4.png"), path)
    subprocess.run(
        [
            exiftool,
            "-q",
            "-overwrite_original",
            "-XMP-dc:Title=Baby, 1950",
            f"-XMP-iptcExt:DigitalSourceType={NEWSCODES}negativeFilm",
            str(path),
        ],
        check=True,
    )
    return path


def _process(capsys, *argv: str) -> dict:
    code = main(["process", *argv, "--json"])
    lines = capsys.readouterr().out.splitlines()
    (record,) = [json.loads(line) for line in lines]
    assert code == 0, record
    return record


def test_every_output_carries_the_type_its_chain_earned_read_back_by_exiftool(
    tmp_path, capsys, cache, scan
):
    exiftool = _exiftool()
    weights = tiny_compact(tmp_path / "tiny-x2.pth", scale=2)
    assert main(["models", "import", str(weights), "--id", "tiny-x2", "--licence", "MIT"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    classical = _process(capsys, str(scan), "--out", str(out), "--chain", "denoise")
    learned = _process(capsys, str(scan), "--out", str(out), "--model", "tiny-x2", "--scale", "2")
    expected = {
        classical["output"]: ALGORITHMICALLY_ENHANCED,
        learned["output"]: COMPOSITE_WITH_TRAINED,
    }
    for output, wanted in expected.items():
        tags = _read_xmp(exiftool, Path(output))
        assert tags["XMP-iptcExt:DigitalSourceType"] == wanted, output
        assert tags["XMP-dc:Title"] == "Baby, 1950"  # the source's own XMP is still there
        assert tags["XMP-scanrestore:SourceDigitalSourceType"] == NEWSCODES + "negativeFilm"
    learned_tags = _read_xmp(exiftool, Path(learned["output"]))
    sha = learned["stages"][0]["params"]["model_sha256"]
    assert learned_tags["XMP-iptcExt:AISystemUsed"] == "tiny-x2"
    assert learned_tags["XMP-iptcExt:AISystemVersionUsed"] == f"sha256:{sha}"
    assert learned_tags["XMP-scanrestore:Models"] == f"tiny-x2 sha256:{sha} licence:MIT"
    assert learned["stages"][0]["params"]["model_licence"] == "MIT"
    assert "XMP-iptcExt:AISystemUsed" not in _read_xmp(exiftool, Path(classical["output"]))


def test_the_collections_source_type_comes_from_the_config(tmp_path, capsys, cache):
    exiftool = _exiftool()
    config = tmp_path / "config.toml"
    config.write_text('[provenance]\nsource_type = "print"\n')
    photo = shared_file("corpus/sr_benchmark/Set5/LR_bicubic_X4/babyx4.png")
    out = tmp_path / "out"
    argv = ["--config", str(config), "process", str(photo), "--out", str(out), "--chain", "denoise"]
    assert main(argv) == 0
    tags = _read_xmp(exiftool, out / "babyx4.v1.png")
    assert tags["XMP-scanrestore:SourceDigitalSourceType"] == NEWSCODES + "print"
    assert tags["XMP-iptcExt:DigitalSourceType"] == ALGORITHMICALLY_ENHANCED


# ------------------------------------------------------------------ licence policy


def test_a_model_under_a_licence_not_allowed_is_refused_before_any_image(tmp_path, capsys, cache):
    weights = tiny_compact(tmp_path / "codeformer-like.pth", scale=2)
    argv = ["models", "import", str(weights), "--id", "nc-x2", "--licence", "S-Lab-1.0"]
    assert main(argv) == 0
    capsys.readouterr()
    photo = tmp_path / "never.png"
    out = tmp_path / "out"
    code = main(["process", str(photo), "--out", str(out), "--model", "nc-x2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1
    assert "pipeline.stages[0] (upscale): model nc-x2 has licence 'S-Lab-1.0'" in err[0]
    assert "models.allowed_licences" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_the_daemon_refuses_to_start_with_a_model_the_policy_refuses(tmp_path, caplog, cache):
    weights = tiny_compact(tmp_path / "w.pth", scale=2)
    config = tmp_path / "config.toml"
    (tmp_path / "scans").mkdir()
    config.write_text(
        f'[models]\nauto_fetch = false\ncache_dir = "{cache}"\nallowed_licences = ["MIT"]\n'
        f'[watch]\ninput = "{tmp_path / "scans"}"\noutput = "{tmp_path / "restored"}"\n'
        f'mode = "polling"\n[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[pipeline.stages]]\nkind = "upscale"\nmodel = "{weights}"\nscale = 2.0\n'
    )
    code = main(["--config", str(config), "watch", "--once"])
    err = caplog.text
    assert code == 78
    assert f"model file:{weights.name} has licence 'unknown'" in err
    assert "pipeline.stages[0] (upscale)" in err
