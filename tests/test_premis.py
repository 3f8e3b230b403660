"""`scanrestore export premis`: PREMIS 3 XML that validates against the official schema (the
PREMIS Editorial Committee's premis-v3-0.xsd, vendored in tests/data), for a source recorded
in a real SQLite store with two versions, a duplicate name and fixity audits; each output
derives from the source through the run event that made it."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import shared_file
from lxml import etree

from daemon.cli import main
from daemon.premis import PREMIS_NS, PremisError, premis_xml
from daemon.store import OutputFile, open_database
from pipeline.files import sha256_file

# Source: https://github.com/PREMIS-EC/editorial-committee, docs/DataDictionary/v3/
# premis-v3-0.xsd (the schema published at https://www.loc.gov/standards/premis/v3/premis-v3-0.xsd).
XSD = Path(__file__).parent / "data" / "premis-v3-0.xsd"
# METS 1.12.1 (https://www.loc.gov/standards/mets/mets.xsd) as metsrw 0.7.0 ships it
# (metsrw/resources/mets.xsd), and the METS XLink schema it imports
# (https://www.loc.gov/standards/xlink/xlink.xsd) as Digital-Preservation-Finland/
# dpres-xml-schemas keeps it (schema_catalogs/schemas_external/shared/xlink/loc.gov.xlink).
METS_XSD = XSD.parent / "mets-1.12.1.xsd"
XLINK = "http://www.w3.org/1999/xlink"
NS = {"p": PREMIS_NS}
MODEL_SHA = "12" * 32


def _schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(XSD)))


def _stage(model: str, licence: str | None) -> dict:
    params = {"model": model, "model_sha256": MODEL_SHA, "scale": 2.0, "tile": 256}
    if licence is not None:
        params["model_licence"] = licence
    return {"stage": "upscale", "version": 3, "params": params, "seconds": 1.5, "skipped": None}


@pytest.fixture
def site(tmp_path):
    """A store as the daemon leaves it: photo.png seen, then the same bytes as dup/copy.png
    (a duplicate), two runs with different recipes (v1 and v2: image + mask each), a curator's
    approval of v1, a clean fixity audit, then an audit after v2's image was damaged."""
    scans, restored, state = tmp_path / "scans", tmp_path / "restored", tmp_path / "state"
    (scans / "dup").mkdir(parents=True)
    restored.mkdir()
    state.mkdir()
    source = shared_file("corpus/sr_benchmark/Set5/LR_bicubic_X4/babyx4.png")
    shutil.copy(source, scans / "photo.png")
    shutil.copy(source, scans / "dup" / "copy.png")
    sha = sha256_file(scans / "photo.png")
    store = open_database(state / "scanrestore.db")
    size = (scans / "photo.png").stat().st_size
    store.record_observation("photo.png", sha, size=size)
    store.record_observation("dup/copy.png", sha, size=size)
    store.record_event(
        "duplicate", path="dup/copy.png", source_sha256=sha, detail={"same_bytes_as": "photo.png"}
    )
    runs = []
    for version, (model, licence) in enumerate(
        (("realesrgan-x2plus", None), ("tiny-x2", "MIT")), start=1
    ):
        recipe = store.record_recipe({"stages": [{"stage": "upscale", "model": model}]})
        files = []
        for suffix, kind in ((".png", "image"), (".mask.png", "mask")):
            out = restored / f"photo.v{version}{suffix}"
            out.write_bytes(f"{kind} {version}".encode() * 100)
            files.append(
                OutputFile(out.name, version, sha256_file(out), out.stat().st_size, kind=kind)
            )
        now = datetime.now(UTC)
        runs.append(
            store.record_run(
                source_sha256=sha,
                path="photo.png",
                recipe_sha256=recipe,
                status="done",
                started_at=now,
                finished_at=now,
                code_version="0.1.0",
                run_token=f"{version:016x}",
                stages=[_stage(model, licence)],
                outputs=files,
            )
        )

    def locate(item):
        return (scans if item.kind == "original" else restored) / item.path

    approved = store.published_image_at("photo.v1.png")
    store.record_review(approved.output_id, "approved", reviewer="ada", note="faces faithful")
    store.audit_fixity(locate)
    (restored / "photo.v2.png").write_bytes(b"bit rot")
    store.audit_fixity(locate)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[watch]\ninput = "{scans}"\noutput = "{restored}"\n[daemon]\nstate_dir = "{state}"\n'
    )
    yield {"store": store, "sha": sha, "runs": runs, "config": config, "scans": scans}
    store.close()


def _export(site, tmp_path, capsys) -> etree._Element:
    out = tmp_path / "premis"
    argv = ["--config", str(site["config"]), "export", "premis", str(site["scans"] / "photo.png")]
    assert main([*argv, "--out", str(out)]) == 0
    assert "ok     photo.png ->" in capsys.readouterr().out
    (written,) = out.iterdir()
    assert written.name == f"photo.png.{site['sha'][:12]}.premis.xml"
    return etree.parse(str(written)).getroot()


def test_the_export_validates_against_the_premis_3_schema(site, tmp_path, capsys):
    document = _export(site, tmp_path, capsys)
    schema = _schema()
    assert schema.validate(document), schema.error_log
    assert document.get("version") == "3.0"


def test_a_schema_violation_is_caught_by_the_validation_used():
    """The check above can fail: a PREMIS object without its required characteristics does."""
    bad = etree.fromstring(
        f'<premis xmlns="{PREMIS_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
        ' version="3.0"><object xsi:type="file"><objectIdentifier><objectIdentifierType>l'
        "</objectIdentifierType><objectIdentifierValue>x</objectIdentifierValue>"
        "</objectIdentifier></object></premis>"
    )
    assert not _schema().validate(bad)


def _values(element, path: str) -> list[str]:
    return [node.text for node in element.xpath(path, namespaces=NS)]


def test_objects_carry_fixity_size_format_and_every_name(site, tmp_path, capsys):
    document = _export(site, tmp_path, capsys)
    sha = site["sha"]
    objects = {_values(o, "p:objectIdentifier[1]/p:objectIdentifierValue")[0]: o for o in
               document.xpath("p:object", namespaces=NS)}  # fmt: skip
    assert sorted(objects) == sorted(
        [f"sha256:{sha}", "photo.v1.png", "photo.v1.mask.png", "photo.v2.png", "photo.v2.mask.png"]
    )
    source = objects[f"sha256:{sha}"]
    assert _values(source, "p:objectIdentifier/p:objectIdentifierValue")[1:] == [
        "photo.png",
        "dup/copy.png",
    ]  # the duplicate's name is one more identifier of the same object
    assert _values(source, ".//p:messageDigest") == [sha]
    assert _values(source, ".//p:messageDigestAlgorithm") == ["SHA-256"]
    assert _values(source, ".//p:size") == [str((site["scans"] / "photo.png").stat().st_size)]
    assert _values(source, ".//p:formatName") == ["image/png"]
    v2 = objects["photo.v2.png"]
    recorded = site["store"].run(site["runs"][1]).outputs[0]
    assert _values(v2, ".//p:messageDigest") == [recorded.output_sha256]
    assert _values(v2, ".//p:size") == [str(recorded.bytes)]


def test_each_output_derives_from_the_source_through_the_run_that_made_it(site, tmp_path, capsys):
    document = _export(site, tmp_path, capsys)
    events = {_values(e, "p:eventIdentifier/p:eventIdentifierValue")[0]: e for e in
              document.xpath("p:event", namespaces=NS)}  # fmt: skip
    for version, run_id in enumerate(site["runs"], start=1):
        (obj,) = document.xpath(
            f"p:object[p:objectIdentifier/p:objectIdentifierValue='photo.v{version}.png']",
            namespaces=NS,
        )
        (relationship,) = obj.xpath("p:relationship", namespaces=NS)
        assert _values(relationship, "p:relationshipType") == ["derivation"]
        assert _values(relationship, "p:relationshipSubType") == ["has source"]
        assert _values(relationship, ".//p:relatedObjectIdentifierValue") == [
            f"sha256:{site['sha']}"
        ]
        (event_id,) = _values(relationship, ".//p:relatedEventIdentifierValue")
        assert event_id == f"run-{run_id}"
        event = events[event_id]
        assert _values(event, "p:eventType") == ["creation"]
        assert _values(event, ".//p:eventOutcome") == ["success"]
        linked = _values(event, "p:linkingObjectIdentifier/p:linkingObjectIdentifierValue")
        assert f"photo.v{version}.png" in linked and f"sha256:{site['sha']}" in linked
        details = " ".join(_values(event, ".//p:eventDetail"))
        assert "stage upscale v3" in details and '"scale": 2.0' in details


def test_events_and_agents_tell_ingestion_digests_fixity_and_the_models_with_licences(
    site, tmp_path, capsys
):
    document = _export(site, tmp_path, capsys)
    types = _values(document, "p:event/p:eventType")
    assert types.count("ingestion") == 2  # photo.png and the duplicate dup/copy.png
    assert types.count("message digest calculation") == 5  # the source and four outputs
    ingestion = " ".join(_values(document, "p:event[p:eventType='ingestion']//p:eventDetail"))
    assert "duplicate: the same bytes as photo.png" in ingestion
    fixity = document.xpath("p:event[p:eventType='fixity check']", namespaces=NS)
    outcomes = {
        (
            _values(e, "p:linkingObjectIdentifier/p:linkingObjectIdentifierValue")[0],
            _values(e, ".//p:eventOutcome")[0],
        )
        for e in fixity
    }
    assert len(fixity) == 10  # two audits x (the source and four outputs)
    assert ("photo.v2.png", "fail") in outcomes and ("photo.v2.png", "pass") in outcomes
    assert ("photo.v1.png", "fail") not in outcomes
    assert (f"sha256:{site['sha']}", "fail") not in outcomes
    agents = {_values(a, "p:agentName")[0]: a for a in document.xpath("p:agent", namespaces=NS)}
    assert _values(agents["scanrestore"], "p:agentType") == ["software"]
    for model, licence in (("realesrgan-x2plus", "BSD-3-Clause"), ("tiny-x2", "MIT")):
        assert _values(agents[model], "p:agentVersion") == [f"sha256:{MODEL_SHA}"]
        assert _values(agents[model], "p:agentNote") == [f"licence: {licence}"]


def test_an_unknown_source_is_an_error_naming_it(site, tmp_path, capsys):
    with pytest.raises(PremisError, match="no source with sha256 00"):
        premis_xml(site["store"], "00" * 32)
    stray = site["scans"] / "never-seen.png"
    argv = ["--config", str(site["config"]), "export", "premis", str(stray)]
    assert main(argv) == 1
    assert f"{stray}: not recorded by the daemon" in capsys.readouterr().err


def test_all_sources_are_exported_one_file_each(site, tmp_path, capsys):
    out = tmp_path / "all"
    argv = ["--config", str(site["config"]), "export", "premis", "--all", "--out", str(out)]
    assert main(argv) == 0
    assert len(list(out.glob("*.premis.xml"))) == 1  # the duplicate is the same source


def test_a_review_decision_is_an_event_with_the_curator_as_agent(site, tmp_path, capsys):
    document = _export(site, tmp_path, capsys)
    (review,) = document.xpath("p:event[p:eventType='review decision']", namespaces=NS)
    assert _values(review, ".//p:eventOutcome") == ["approved"]
    assert _values(review, ".//p:eventOutcomeDetailNote") == ["faces faithful"]
    assert _values(review, ".//p:linkingAgentIdentifierValue") == ["curator-ada"]
    assert _values(review, ".//p:linkingObjectIdentifierValue") == ["photo.v1.png"]
    (curator,) = document.xpath("p:agent[p:agentName='ada']", namespaces=NS)
    assert _values(curator, "p:agentType") == ["person"]


# ------------------------------------------------------------------ the daemon, end to end


def test_a_daemon_sources_export_validates_and_its_outputs_carry_the_standards(tmp_path, capsys):
    """Real worker processes: bird.png published as v1, the same bytes dropped under a second
    name (a duplicate), a new recipe making v2, a fixity audit; every output is signed with
    C2PA and says compositeWithTrainedAlgorithmicMedia, and the source's PREMIS validates with
    two creation events, each output deriving from the source through its run."""
    from c2pakeys import make_keys
    from modelfactory import nearest_compact
    from test_daemon import Site

    from daemon.config import load_config
    from daemon.service import Daemon
    from pipeline.credentials import read_manifest
    from pipeline.image import decode
    from pipeline.sourcetype import COMPOSITE_WITH_TRAINED, NEWSCODES

    keys = make_keys(tmp_path / "keys")
    provenance = {
        "source_type": "print",
        "c2pa_cert": str(keys["chain"]),
        "c2pa_key": str(keys["key"]),
    }
    model = nearest_compact(tmp_path / "nearest2x.pth", scale=2)
    site = Site(tmp_path / "site", model, provenance=provenance)
    shutil.copy(shared_file("corpus/sr_benchmark/Set5/HR/bird.png"), site.scans / "bird.png")
    assert site.once() == 0
    (site.scans / "copies").mkdir()
    shutil.copy(site.scans / "bird.png", site.scans / "copies" / "bird-again.png")
    assert site.once() == 0
    site.write_config(scale=1.5, provenance=provenance)
    assert site.once() == 0
    Daemon(load_config(site.config)).audit_fixity()
    assert {"bird.v1.png", "bird.v2.png"} <= set(site.outputs())
    for version in (1, 2):
        output = site.out / f"bird.v{version}.png"
        xmp = decode(output).metadata.xmp
        assert COMPOSITE_WITH_TRAINED.encode() in xmp
        assert f"{NEWSCODES}print".encode() in xmp  # the collection's source type
        reader = read_manifest(output, "png", trust_anchors=keys["root"].read_bytes())
        assert reader.get_validation_state() == "Trusted", reader.get_validation_results()
        sidecar = json.loads((site.out / f"bird.v{version}.json").read_text())
        assert sidecar["content_credentials"] == "c2pa"
    out = tmp_path / "premis"
    argv = ["--config", str(site.config), "export", "premis", "--all", "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 0
    (written,) = out.iterdir()
    document = etree.parse(str(written)).getroot()
    schema = _schema()
    assert schema.validate(document), schema.error_log
    types = _values(document, "p:event/p:eventType")
    assert types.count("creation") == 2 and types.count("ingestion") == 2
    assert "fixity check" in types
    for version in (1, 2):
        (obj,) = document.xpath(
            f"p:object[p:objectIdentifier/p:objectIdentifierValue='bird.v{version}.png']",
            namespaces=NS,
        )
        (event_id,) = _values(obj, "p:relationship//p:relatedEventIdentifierValue")
        assert event_id.startswith("run-")
        assert event_id in _values(document, "p:event/p:eventIdentifier/p:eventIdentifierValue")


def _mets_schema() -> etree.XMLSchema:
    """METS 1.12.1 and PREMIS 3 together (so the PREMIS inside the METS is validated too, not
    skipped as lax content), METS's XLink schema read from tests/data instead of loc.gov."""

    class Local(etree.Resolver):
        def resolve(self, url, public_id, context):
            if url.endswith("/xlink.xsd"):
                return self.resolve_filename(str(XSD.parent / "xlink.xsd"), context)
            return None

    driver = (
        '<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">'
        f'<xs:import namespace="http://www.loc.gov/METS/" schemaLocation="{METS_XSD.as_uri()}"/>'
        f'<xs:import namespace="{PREMIS_NS}" schemaLocation="{XSD.as_uri()}"/>'
        "</xs:schema>"
    )
    parser = etree.XMLParser()
    parser.resolvers.add(Local())
    return etree.XMLSchema(etree.fromstring(driver, parser))


def test_the_mets_wrapping_validates_and_lists_every_file_with_its_checksum(site, tmp_path, capsys):
    out = tmp_path / "mets"
    argv = ["--config", str(site["config"]), "export", "premis", "--all", "--mets"]
    assert main([*argv, "--out", str(out)]) == 0
    (written,) = out.iterdir()
    assert written.name.endswith(".mets.xml")
    document = etree.parse(str(written)).getroot()
    schema = _mets_schema()
    assert schema.validate(document), schema.error_log
    mets = {"m": "http://www.loc.gov/METS/", "p": PREMIS_NS}
    (premis,) = document.xpath("//m:digiprovMD/m:mdWrap/m:xmlData/p:premis", namespaces=mets)
    assert _schema().validate(etree.fromstring(etree.tostring(premis)))
    files = {
        f.xpath("string(m:FLocat/@xlink:href)", namespaces=mets | {"xlink": XLINK}): f
        for f in document.xpath("//m:file", namespaces=mets)
    }
    assert sorted(files) == sorted(
        ["photo.png", "photo.v1.png", "photo.v1.mask.png", "photo.v2.png", "photo.v2.mask.png"]
    )
    assert files["photo.png"].get("CHECKSUM") == site["sha"]
    assert files["photo.png"].getparent().get("USE") == "original"
    versions = document.xpath("//m:structMap/m:div/m:div/@LABEL", namespaces=mets)
    assert versions == ["v1", "v2"]
