"""Exceptions raised by the pipeline: every message names the file, model or option at fault."""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """Base class for every error the pipeline raises on purpose."""


class ImageError(PipelineError):
    """An image could not be read or written; `path` names it and `reason` says why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DecodeError(ImageError):
    """The file is damaged or is not an image we can read correctly."""


class UnsupportedImageError(DecodeError):
    """A valid image we refuse rather than decode wrongly (HEIC, 12-bit JPEG, CMYK...)."""


class ImageTooLargeError(DecodeError):
    """The declared pixel count exceeds the configured limit (decompression-bomb guard)."""


class EncodeError(ImageError):
    """The output could not be written in the requested format."""


class ModelError(PipelineError):
    """A model could not be found, fetched, verified or loaded."""


class UnknownModelError(ModelError):
    """The id is neither in the registry nor a file on disk."""


class ModelNotAvailableError(ModelError):
    """The model is known but its weights are not in the cache (fetch or import them)."""


class HashMismatchError(ModelError):
    """Bytes on disk or on the wire do not have the SHA-256 the registry expects."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        self.what = what
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what}: sha256 mismatch: expected {expected}, got {actual}")


class DownloadError(ModelError):
    """The transfer failed or was cut short."""


class ArchitectureMismatchError(ModelError):
    """The weights load, but as a different architecture or scale than the spec says."""


class StageError(PipelineError):
    """A stage was configured or used wrongly."""
