"""The registry of image formats: an explicit dict, one entry per format module, in the order
files are sniffed and FORMATS is listed."""

from __future__ import annotations

from pipeline.image.formats import jpeg, png, tiff, webp
from pipeline.image.plugin import Format

__all__ = ["FORMATS", "REGISTRY", "register"]

REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add a format under its `name`; a name or alias another format already has is an error."""
    taken = {name for known in REGISTRY.values() for name in (known.name, *known.aliases)}
    for name in (fmt.name, *fmt.aliases):
        if name in taken:
            raise ValueError(f"image format name {name!r} is already registered")
    REGISTRY[fmt.name] = fmt
    return fmt


register(jpeg.FORMAT)
register(png.FORMAT)
register(tiff.FORMAT)
register(webp.FORMAT)

FORMATS = tuple(REGISTRY)  # the format names, as Image.format and encode(format=...) take them
