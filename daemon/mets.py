"""A source's PREMIS wrapped in METS, as repositories that ingest packages (Archivematica, DSpace,
national libraries) expect it: the PREMIS in a digiprovMD, every file (the scan and each output)
with its checksum in the fileSec, and a structMap of the source and its versions."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import PurePosixPath

from lxml import etree

from daemon.premis import PREMIS_NS, premis_document
from daemon.store import Store

__all__ = ["METS_NS", "mets_xml"]

METS_NS = "http://www.loc.gov/METS/"
XLINK_NS = "http://www.w3.org/1999/xlink"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
SCHEMA_LOCATION = f"{METS_NS} https://www.loc.gov/standards/mets/mets.xsd"


def _m(tag: str) -> str:
    return f"{{{METS_NS}}}{tag}"


def mets_xml(
    store: Store, source_sha256: str, *, licences: dict[str, str] | None = None, software: str
) -> bytes:
    """The METS document of one source as UTF-8 XML bytes: its PREMIS (see
    daemon.premis.premis_document) with the files and versions it describes."""
    premis = premis_document(store, source_sha256, licences=licences or {})
    root = etree.Element(_m("mets"), nsmap={"mets": METS_NS, "xlink": XLINK_NS, "xsi": XSI_NS})
    root.set(f"{{{XSI_NS}}}schemaLocation", SCHEMA_LOCATION)
    root.set("OBJID", f"sha256:{source_sha256}")
    header = etree.SubElement(root, _m("metsHdr"))
    header.set("CREATEDATE", datetime.now(UTC).replace(microsecond=0).isoformat())
    agent = etree.SubElement(header, _m("agent"), ROLE="CREATOR", TYPE="OTHER")
    agent.set("OTHERTYPE", "SOFTWARE")
    etree.SubElement(agent, _m("name")).text = software
    amd = etree.SubElement(root, _m("amdSec"), ID="amd-1")
    provenance = etree.SubElement(amd, _m("digiprovMD"), ID="premis-1")
    wrap = etree.SubElement(provenance, _m("mdWrap"), MDTYPE="PREMIS", MDTYPEVERSION="3.0")
    etree.SubElement(wrap, _m("xmlData")).append(premis)
    _files_and_structure(root, premis)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def _files_and_structure(root: etree._Element, premis: etree._Element) -> None:
    """fileSec (the scan under USE="original", each output under USE="restored" with its
    version) and the structMap: one div for the source, one per version."""
    ns = {"p": PREMIS_NS}
    files = etree.SubElement(root, _m("fileSec"))
    groups: dict[str, etree._Element] = {}
    structure = etree.SubElement(root, _m("structMap"), TYPE="physical")
    source_div = etree.SubElement(structure, _m("div"), TYPE="source")
    versions: dict[str, etree._Element] = {}
    for index, obj in enumerate(premis.xpath("p:object", namespaces=ns), start=1):
        identifier = obj.xpath(
            "string(p:objectIdentifier[1]/p:objectIdentifierValue)", namespaces=ns
        )
        names = obj.xpath(
            "p:objectIdentifier[position() > 1]/p:objectIdentifierValue/text()", namespaces=ns
        )
        location = names[0] if names else identifier
        original = index == 1  # premis_document puts the source first
        use = "original" if original else "restored"
        if use not in groups:
            groups[use] = etree.SubElement(files, _m("fileGrp"), USE=use)
        entry = etree.SubElement(groups[use], _m("file"))
        entry.set("ID", f"file-{index}")
        entry.set("ADMID", "premis-1")
        entry.set("CHECKSUMTYPE", "SHA-256")
        entry.set("CHECKSUM", obj.xpath("string(.//p:messageDigest)", namespaces=ns))
        entry.set("SIZE", obj.xpath("string(.//p:size)", namespaces=ns))
        entry.set("MIMETYPE", obj.xpath("string(.//p:formatName)", namespaces=ns))
        flocat = etree.SubElement(entry, _m("FLocat"), LOCTYPE="OTHER", OTHERLOCTYPE="SYSTEM")
        flocat.set(f"{{{XLINK_NS}}}href", location)
        if original:
            source_div.set("LABEL", location)
            etree.SubElement(source_div, _m("fptr"), FILEID=f"file-{index}")
            continue
        version = _version_of(location)
        if version not in versions:
            versions[version] = etree.SubElement(
                source_div, _m("div"), TYPE="version", LABEL=version
            )
        etree.SubElement(versions[version], _m("fptr"), FILEID=f"file-{index}")


def _version_of(path: str) -> str:
    """ "v2" for "album/photo.v2.mask.png" (the versioned names daemon.publish gives)."""
    for part in PurePosixPath(path).name.split("."):
        if part.startswith("v") and part[1:].isdigit():
            return part
    return "unversioned"
