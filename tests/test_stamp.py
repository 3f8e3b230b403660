"""Provenance stamped into outputs: Software tag and XMP, with the original's metadata intact."""

from __future__ import annotations

import piexif
import pytest
from conftest import shared_file
from test_image_conformance import exif_dict

from pipeline.image import Metadata, decode, encode
from pipeline.stamp import _OURS, NAMESPACE, stamp

FIELDS = {"RunId": "run-42", "RecipeSHA256": "ab" * 32}
STAGES = ["denoise v1 nlm", "upscale v1 realesrgan-x4plus sha256:4fa0 <x4>"]


@pytest.mark.parametrize("fmt", ["jpeg", "png", "tiff", "webp"])
def test_software_and_xmp_land_in_the_file_and_every_other_exif_tag_survives(tmp_path, fmt):
    source = decode(shared_file("corpus/metadata_edge_cases/exifsamples_Canon_40D.jpg"))
    metadata = stamp(
        source.metadata, software="scanrestore 0.1.0", properties=FIELDS, stages=STAGES
    )
    encode(source, tmp_path / f"plain.{fmt}", format=fmt)
    encode(source.replace(metadata=metadata), tmp_path / f"stamped.{fmt}", format=fmt)
    plain = exif_dict(decode(tmp_path / f"plain.{fmt}").metadata.exif)
    back = decode(tmp_path / f"stamped.{fmt}")
    stamped = exif_dict(back.metadata.exif)
    assert stamped["0th"].pop(piexif.ImageIFD.Software) == b"scanrestore 0.1.0"
    original = plain["0th"].pop(piexif.ImageIFD.Software, None)
    for pointer in (34665, 34853, 40965):  # sub-IFD offsets move with the data before them
        for tags in (*plain.values(), *stamped.values()):
            if isinstance(tags, dict):
                tags.pop(pointer, None)
    for ifd in ("0th", "Exif", "GPS", "Interop"):  # the same tags as without the stamp
        assert stamped[ifd] == plain[ifd], f"{fmt}: EXIF {ifd} differs"
    xmp = back.metadata.xmp.decode()
    assert NAMESPACE in xmp and "<scanrestore:RunId>run-42</scanrestore:RunId>" in xmp
    assert "&lt;x4&gt;" in xmp  # stage text is escaped, the packet stays well-formed
    if original:
        assert f"<scanrestore:OriginalSoftware>{original.decode()}" in xmp


def test_an_existing_xmp_packet_keeps_its_content():
    source = decode(shared_file("corpus/metadata_edge_cases/pillow_xmp_tags_orientation.png"))
    original = source.metadata.xmp
    stamped = stamp(source.metadata, software="scanrestore", properties=FIELDS).xmp
    close = original.rfind(b"</rdf:RDF>")
    assert _OURS.sub(b"", stamped) == original[:close] + b"\n" + original[close:]


def test_stamping_twice_replaces_our_description_instead_of_adding_one():
    once = stamp(Metadata(), software="a", properties={"RunId": "1"})
    twice = stamp(once, software="a", properties={"RunId": "2"})
    assert twice.xmp.count(NAMESPACE.encode()) == 1
    assert b"<scanrestore:RunId>2<" in twice.xmp and b">1<" not in twice.xmp


def test_an_image_without_exif_gets_a_minimal_block_with_software():
    stamped = stamp(Metadata(), software="scanrestore 0.1.0", properties=FIELDS)
    assert exif_dict(stamped.exif)["0th"] == {piexif.ImageIFD.Software: b"scanrestore 0.1.0"}
