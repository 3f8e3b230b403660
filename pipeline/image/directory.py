"""TIFF directories (IFDs), the structure of EXIF blocks and of TIFF files alike: read, serialise,
and relocate one with entries copied verbatim. Our own small reader and writer, because piexif
and Pillow re-serialise every value on output (moving maker notes, whose internal offsets then
point at the wrong bytes) and neither writes a sub-IFD into a TIFF."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipeline.image import tags

__all__ = [
    "DirectoryError",
    "Entry",
    "Layout",
    "entry_head",
    "entry_int",
    "exif_block",
    "header",
    "ifd_bytes",
    "ifd_table",
    "raw_entry",
    "read_header",
    "read_ifd",
]

MAX_ENTRIES = 65535  # the most a classic TIFF directory can hold

Buffer = bytes | bytearray | mmap.mmap


class DirectoryError(ValueError):
    """A TIFF-structured block cannot be parsed safely."""


class Layout(NamedTuple):
    """What a TIFF header says about the file: byte order, classic or BigTIFF, first IFD."""

    order: str  # struct byte order: "<" or ">"
    big: bool  # BigTIFF: 8-byte counts and offsets, 20-byte entries
    first_ifd: int

    @property
    def word(self) -> str:
        """struct format of an offset (and of an entry's count)."""
        return "Q" if self.big else "I"

    @property
    def entry_size(self) -> int:
        return 20 if self.big else 12

    @property
    def first_ifd_pointer(self) -> int:
        """Where the header stores the offset of the first IFD."""
        return 8 if self.big else 4


@dataclass(frozen=True)
class Entry:
    """One directory entry as read, with where it stands so it can be patched in place."""

    tag: int
    kind: int  # TIFF field type
    count: int
    data: bytes | None  # value bytes in the source byte order; None if unreadable
    position: int  # offset of the directory entry itself, for patching in place
    children: tuple[Entry, ...] | None = None  # the sub-IFD an Exif/GPS/Interop pointer leads to


def read_header(buf: Buffer) -> Layout:
    """Read the TIFF header at the start of `buf`; raise DirectoryError if there is none."""
    if len(buf) < 8:
        raise DirectoryError("too short for a TIFF header")
    order = {b"II": "<", b"MM": ">"}.get(bytes(buf[:2]))
    if order is None:
        raise DirectoryError("no TIFF byte-order mark")
    (magic,) = struct.unpack_from(order + "H", buf, 2)
    if magic == 42:
        return Layout(order, False, struct.unpack_from(order + "I", buf, 4)[0])
    if magic == 43 and len(buf) >= 16:
        return Layout(order, True, struct.unpack_from(order + "Q", buf, 8)[0])
    raise DirectoryError(f"TIFF magic number {magic} is neither 42 nor 43")


def header(order: str) -> bytes:
    """A classic TIFF header in byte order `order` whose first IFD follows it at offset 8."""
    return (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8)


def read_ifd(
    buf: Buffer, offset: int, layout: Layout, *, follow: bool = True
) -> tuple[list[Entry], int]:
    """Read the directory at `offset`; return its entries and the offset of the next directory.

    With `follow`, Exif/GPS/Interop pointers are read into `children`. Structural damage raises
    DirectoryError; an entry whose value lies outside the data is kept with data None. A
    directory reached twice is damage too: besides loops, pointers fanning out to one shared
    directory would make the walk exponential (a few kilobytes of EXIF, billions of entries).
    """
    return _read_ifd(buf, offset, layout, follow, 0, set())


def _read_ifd(
    buf: Buffer, offset: int, layout: Layout, follow: bool, depth: int, seen: set[int]
) -> tuple[list[Entry], int]:
    count_format, head = ("Q", 8) if layout.big else ("H", 2)
    word = 8 if layout.big else 4
    if depth > 3:
        raise DirectoryError("sub-directories nest too deeply (a loop?)")
    if offset in seen:
        raise DirectoryError(f"directory at {offset} is reached twice (a loop?)")
    seen.add(offset)
    if offset < 8 or offset + head > len(buf):
        raise DirectoryError(f"directory offset {offset} lies outside the data")
    (count,) = struct.unpack_from(layout.order + count_format, buf, offset)
    table_end = offset + head + count * layout.entry_size
    if table_end + word > len(buf):
        raise DirectoryError(f"directory at {offset} with {count} entries runs past the data")
    if count > MAX_ENTRIES:  # only BigTIFF can declare more; each entry costs memory
        raise DirectoryError(f"directory at {offset} declares {count} entries")
    entries = [
        _read_entry(buf, offset + head + index * layout.entry_size, layout, follow, depth, seen)
        for index in range(count)
    ]
    (next_ifd,) = struct.unpack_from(layout.order + layout.word, buf, table_end)
    return entries, next_ifd


def _read_entry(
    buf: Buffer, position: int, layout: Layout, follow: bool, depth: int, seen: set[int]
) -> Entry:
    order = layout.order
    tag, kind, count = struct.unpack_from(order + "HH" + layout.word, buf, position)
    value_field = position + (12 if layout.big else 8)
    size = tags.TYPE_SIZES.get(kind)
    if size is None:
        return Entry(tag, kind, count, None, position)
    length = size * count
    start = value_field
    if length > (8 if layout.big else 4):
        (start,) = struct.unpack_from(order + layout.word, buf, value_field)
    if start + length > len(buf):
        return Entry(tag, kind, count, None, position)
    data = bytes(buf[start : start + length])
    children = None
    if follow and tag in tags.SUB_IFD_POINTERS and count == 1 and kind in tags.POINTER_TYPES:
        child = int.from_bytes(data, "little" if order == "<" else "big")
        if child:  # 0 is the placeholder a TIFF writer leaves before the sub-IFD is appended
            children = tuple(_read_ifd(buf, child, layout, True, depth + 1, seen)[0])
    return Entry(tag, kind, count, data, position, children)


def entry_int(entry: Entry, order: str) -> int | None:
    """The first value of an unsigned integer entry, or None."""
    number = tags.INTEGER_FORMATS.get(entry.kind)
    if entry.data is None or number is None or not entry.count:
        return None
    return struct.unpack_from(order + number, entry.data)[0]


def ifd_bytes(entries: Sequence[Entry], base: int, source: str, target: str, big: bool) -> bytes:
    """Serialise a directory, its out-of-line values and its sub-directories to start at `base`.

    Values are byte-swapped from the `source` to the `target` order; offsets are absolute, so the
    result is only valid at `base` within its file (or EXIF block).
    """
    usable = [e for e in sorted(entries, key=lambda e: e.tag) if _is_writable(e, big)]
    layout = Layout(target, big, base)
    inline = 8 if big else 4
    table = bytearray(struct.pack(target + ("Q" if big else "H"), len(usable)))
    tail = bytearray()
    tail_base = base + len(table) + len(usable) * layout.entry_size + inline
    for entry in usable:
        if entry.children is not None:
            kind, count = (tags.LONG8 if big else tags.LONG), 1
            offset = tail_base + _pad_even(tail)
            tail += ifd_bytes(entry.children, offset, source, target, big)
            value = struct.pack(target + layout.word, offset)
        else:
            kind, count = entry.kind, entry.count
            data = entry.data if source == target else _swap(entry.data, kind)  # type: ignore[arg-type]
            if len(data) <= inline:
                value = data.ljust(inline, b"\x00")
            else:
                value = struct.pack(target + layout.word, tail_base + _pad_even(tail))
                tail += data
        table += entry_head(entry.tag, kind, count, layout) + value
    table += bytes(inline)  # no next directory
    return bytes(table + tail)


def exif_block(entries: Sequence[Entry], order: str) -> bytes:
    """A classic TIFF-structured EXIF block holding `entries` as its IFD0."""
    return header(order) + ifd_bytes(entries, 8, order, order, big=False)


def raw_entry(buf: Buffer, entry: Entry, layout: Layout) -> bytes:
    """The bytes of `entry`'s row in its directory table, to copy verbatim into another table
    of the same file: its values stay where they are."""
    return bytes(buf[entry.position : entry.position + layout.entry_size])


def entry_head(tag: int, kind: int, count: int, layout: Layout) -> bytes:
    """The tag, type and count of a directory row; its value field follows."""
    return struct.pack(layout.order + "HH" + layout.word, tag, kind, count)


def ifd_table(rows: Iterable[tuple[int, bytes]], next_ifd: int, layout: Layout) -> bytes:
    """A directory table of (tag, row) pairs, ordered by tag as TIFF requires."""
    ordered = sorted(rows, key=lambda row: row[0])
    count = struct.pack(layout.order + ("Q" if layout.big else "H"), len(ordered))
    return (
        count
        + b"".join(row for _, row in ordered)
        + struct.pack(layout.order + layout.word, next_ifd)
    )


def _is_writable(entry: Entry, big: bool) -> bool:
    if entry.children is not None:
        return True
    return entry.data is not None and (big or entry.kind not in tags.BIGTIFF_TYPES)


def _pad_even(tail: bytearray) -> int:
    """Pad `tail` to an even length (TIFF values start on word boundaries); return the length."""
    if len(tail) % 2:
        tail.append(0)
    return len(tail)


def _swap(data: bytes, kind: int) -> bytes:
    unit = tags.SWAP_UNITS.get(kind, 1)
    if unit == 1:
        return data
    return np.frombuffer(data, dtype=f"u{unit}").byteswap().tobytes()
