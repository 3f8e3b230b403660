"""Provenance carried inside an output file: the EXIF Software tag and an XMP description of how
the file was made, added without moving a byte of the original's EXIF or dropping its XMP."""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

from pipeline.image import Metadata, directory, tags

__all__ = ["NAMESPACE", "stamp"]

NAMESPACE = "https://scanrestore.org/ns/1.0/"
_OURS = re.compile(
    rb"<rdf:Description\b[^>]*xmlns:scanrestore=[^>]*?(?:/>|>.*?</rdf:Description>)", re.DOTALL
)


def stamp(
    metadata: Metadata,
    *,
    software: str,
    properties: Mapping[str, str],
    stages: Sequence[str] = (),
) -> Metadata:
    """`metadata` with EXIF Software set to `software` and an XMP description holding
    `properties` (e.g. run id, recipe hash) and `stages` (one line per stage with its model).

    The original Software value, if any, is kept in the XMP as OriginalSoftware: it usually
    names the scanner software, which an archive wants to keep.
    """
    exif, original = _with_software(metadata.exif, software)
    fields = dict(properties)
    if original and original != software:
        fields["OriginalSoftware"] = original
    description = _description(fields, stages)
    return dataclasses.replace(metadata, exif=exif, xmp=_merge_xmp(metadata.xmp, description))


def _description(fields: Mapping[str, str], stages: Sequence[str]) -> bytes:
    lines = [f'<rdf:Description rdf:about="" xmlns:scanrestore="{NAMESPACE}">']
    lines += [
        f"<scanrestore:{key}>{escape(value)}</scanrestore:{key}>" for key, value in fields.items()
    ]
    if stages:
        items = "".join(f"<rdf:li>{escape(line)}</rdf:li>" for line in stages)
        lines.append(f"<scanrestore:Stages><rdf:Seq>{items}</rdf:Seq></scanrestore:Stages>")
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
