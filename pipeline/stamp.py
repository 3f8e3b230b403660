"""Provenance carried inside an output file: the EXIF Software tag and an XMP description of how
the file was made (ours, and IPTC's DigitalSourceType and AI system), added without moving a byte
of the original's EXIF or dropping its XMP."""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, unescape

from pipeline.image import Metadata, directory, tags

__all__ = ["IPTC_EXT", "NAMESPACE", "Disclosure", "source_digital_source_type", "stamp"]

NAMESPACE = "https://scanrestore.org/ns/1.0/"
IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
_OURS = re.compile(
    rb"<rdf:Description\b[^>]*xmlns:scanrestore=[^>]*?(?:/>|>.*?</rdf:Description>)", re.DOTALL
)
_IPTC_PREFIX = re.compile(rb'xmlns:([A-Za-z_][\w.-]*)\s*=\s*["\']' + re.escape(IPTC_EXT.encode()))


@dataclass(frozen=True)
class Disclosure:
    """What IPTC's fields say of an output: its DigitalSourceType (a NewsCode URI; None when no
    stage changed the image, which then takes the source's, if known), the type to record as
    the source's when the source's XMP states none (a collection's `source_type`), and the AI
    systems (models) that made pixels with their versions (SHA-256s), in the same order."""

    digital_source_type: str | None
    default_source_type: str | None = None
    ai_systems: tuple[str, ...] = ()
    ai_system_versions: tuple[str, ...] = ()


def stamp(
    metadata: Metadata,
    *,
    software: str,
    properties: Mapping[str, str],
    stages: Sequence[str] = (),
    models: Sequence[str] = (),
    disclosure: Disclosure | None = None,
) -> Metadata:
    """`metadata` with EXIF Software set to `software` and an XMP description holding
    `properties` (e.g. run id, recipe hash), `stages` (one line per stage with its model),
    `models` (one line per model with its hash and licence) and the IPTC `disclosure`.

    The original Software value, if any, is kept in the XMP as OriginalSoftware: it usually
    names the scanner software, which an archive wants to keep. The source's own
    Iptc4xmpExt:DigitalSourceType (e.g. print) moves to SourceDigitalSourceType: one packet can
    hold the property once, and the output's value is the one IPTC readers must see.
    """
    exif, original = _with_software(metadata.exif, software)
    fields = dict(properties)
    if original and original != software:
        fields["OriginalSoftware"] = original
    xmp, own_type = metadata.xmp, None
    if disclosure is not None:
        own_type = source_digital_source_type(xmp)
        xmp = _without_source_type(xmp)
        if own_type or disclosure.default_source_type:
            fields["SourceDigitalSourceType"] = own_type or disclosure.default_source_type or ""
    if disclosure is not None and disclosure.digital_source_type is None:
        # No stage changed the pixels: the output is what the scan is, where that is known.
        source_type = own_type or disclosure.default_source_type
        disclosure = dataclasses.replace(disclosure, digital_source_type=source_type)
    description = _description(fields, stages, models, disclosure)
    return dataclasses.replace(metadata, exif=exif, xmp=_merge_xmp(xmp, description))


def source_digital_source_type(xmp: bytes | None) -> str | None:
    """The DigitalSourceType an XMP packet states for its image: IPTC's property (element,
    attribute or rdf:resource form) outside our description, else the SourceDigitalSourceType
    we recorded in it (an output processed again keeps its scan's type)."""
    if not xmp:
        return None
    ours = _OURS.search(xmp)
    rest = _OURS.sub(b"", xmp)
    for prefix in _IPTC_PREFIX.findall(rest):
        found = _property(rest, prefix, b"DigitalSourceType")
        if found:
            return found
    if ours:
        return _property(ours.group(0), b"scanrestore", b"SourceDigitalSourceType")
    return None


def _property(xmp: bytes, prefix: bytes, name: bytes) -> str | None:
    qname = re.escape(prefix + b":" + name)
    for pattern in (
        rb"<" + qname + rb"\s*>\s*([^<]+?)\s*</" + qname + rb"\s*>",
        rb"<" + qname + rb'\s+rdf:resource\s*=\s*["\']([^"\']+)["\']',
        rb"\s" + qname + rb'\s*=\s*["\']([^"\']+)["\']',
    ):
        match = re.search(pattern, xmp)
        if match:
            return unescape(match.group(1).decode("utf-8", "replace"))
    return None


def _without_source_type(xmp: bytes | None) -> bytes | None:
    """The packet without IPTC's DigitalSourceType (ours is added after), in any form."""
    if not xmp:
        return xmp
    for prefix in set(_IPTC_PREFIX.findall(xmp)):
        qname = re.escape(prefix + b":DigitalSourceType")
        xmp = re.sub(rb"<" + qname + rb"\b[^>]*/>\s*", b"", xmp)
        xmp = re.sub(rb"<" + qname + rb"\s*>.*?</" + qname + rb"\s*>\s*", b"", xmp, flags=re.S)
        xmp = re.sub(rb"\s" + qname + rb'\s*=\s*(["\'])[^"\']*\1', b"", xmp)
    return xmp


def _description(
    fields: Mapping[str, str],
    stages: Sequence[str],
    models: Sequence[str],
    disclosure: Disclosure | None,
) -> bytes:
    lines = [
        f'<rdf:Description rdf:about="" xmlns:scanrestore="{NAMESPACE}"'
        f' xmlns:Iptc4xmpExt="{IPTC_EXT}">'
    ]
    lines += [
        f"<scanrestore:{key}>{escape(value)}</scanrestore:{key}>" for key, value in fields.items()
    ]
    for name, values in (("Stages", stages), ("Models", models)):
        if values:
            items = "".join(f"<rdf:li>{escape(line)}</rdf:li>" for line in values)
            lines.append(f"<scanrestore:{name}><rdf:Seq>{items}</rdf:Seq></scanrestore:{name}>")
    if disclosure is not None and disclosure.digital_source_type:
        lines.append(
            f"<Iptc4xmpExt:DigitalSourceType>{escape(disclosure.digital_source_type)}"
            "</Iptc4xmpExt:DigitalSourceType>"
        )
    if disclosure is not None and disclosure.ai_systems:
        # IPTC 2025.1's AI System Used / AI System Version Used: plain text properties.
        used = "; ".join(disclosure.ai_systems)
        versions = "; ".join(disclosure.ai_system_versions)
        lines.append(f"<Iptc4xmpExt:AISystemUsed>{escape(used)}</Iptc4xmpExt:AISystemUsed>")
        lines.append(
            f"<Iptc4xmpExt:AISystemVersionUsed>{escape(versions)}</Iptc4xmpExt:AISystemVersionUsed>"
        )
    lines.append("</rdf:Description>")
    return "\n".join(lines).encode()


def _merge_xmp(xmp: bytes | None, description: bytes) -> bytes:
    """Add our rdf:Description to the original packet (several are allowed in one rdf:RDF),
    replacing one we wrote before; a packet we cannot place it in is replaced by a new one."""
    if xmp:
        xmp = _OURS.sub(b"", xmp)
        close = xmp.rfind(b"</rdf:RDF>")
        if close != -1:
            return xmp[:close] + description + b"\n" + xmp[close:]
    return (
        b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        + description
        + b"\n</rdf:RDF>\n</x:xmpmeta>\n"
        + b'<?xpacket end="w"?>'
    )


def _with_software(exif: bytes | None, software: str) -> tuple[bytes, str | None]:
    """EXIF with Software = `software`, and the value it replaced.

    A new IFD0 (the old entries copied verbatim plus Software) is appended and the header
    pointed at it: every original byte stays at its offset, so maker notes and values that
    other entries point to remain valid.
    """
    value = software.encode("utf-8", "replace") + b"\x00"
    if not exif:
        layout = directory.Layout("<", big=False, first_ifd=8)
        buf = bytearray(directory.header(layout.order))
        rows: list[tuple[int, bytes]] = []
        next_ifd, original = 0, None
    else:
        try:
            layout = directory.read_header(exif)
            if layout.big:
                raise directory.DirectoryError("BigTIFF-structured EXIF block")
            entries, next_ifd = directory.read_ifd(exif, layout.first_ifd, layout, follow=False)
        except (directory.DirectoryError, struct.error):
            return _with_software(None, software)  # decode refuses malformed EXIF; be safe
        buf = bytearray(exif)
        rows = [
            (entry.tag, directory.raw_entry(buf, entry, layout))
            for entry in entries
            if entry.tag != tags.SOFTWARE
        ]
        original = next(
            (
                entry.data.rstrip(b"\x00").decode("utf-8", "replace")
                for entry in entries
                if entry.tag == tags.SOFTWARE
                and entry.kind == tags.ASCII
                and entry.data is not None
            ),
            None,
        )
    if len(buf) % 2:
        buf.append(0)
    if len(value) > 4:
        field = struct.pack(layout.order + "I", len(buf))
        buf += value + (b"\x00" if len(value) % 2 else b"")
    else:
        field = value.ljust(4, b"\x00")
    head = directory.entry_head(tags.SOFTWARE, tags.ASCII, len(value), layout)
    rows.append((tags.SOFTWARE, head + field))
    table_offset = len(buf)
    buf += directory.ifd_table(rows, next_ifd, layout)
    struct.pack_into(layout.order + "I", buf, layout.first_ifd_pointer, table_offset)
    return bytes(buf), original
