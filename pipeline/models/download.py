"""Download of official weights: the pinned URL streamed into a temporary file beside the cache
entry, hashed on the fly, and renamed into place only when complete and correct."""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pipeline.errors import DownloadError
from pipeline.files import replace_durably, temp_beside
from pipeline.models.spec import ModelSpec
from pipeline.models.trust import check_sha256

__all__ = ["USER_AGENT", "download", "hash_stream"]

_CHUNK = 1 << 20
USER_AGENT = "scanrestore (model store)"


def hash_stream(
    source: IO[bytes] | http.client.HTTPResponse,
    sink: IO[bytes] | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    total: int | None = None,
) -> tuple[str, int]:
    """Read `source` to its end, hashing (and optionally copying) it; return (sha256, bytes)."""
    digest = hashlib.sha256()
    done = 0
    while chunk := source.read(_CHUNK):
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    return digest.hexdigest(), done


def content_length(response: Any) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def download(
    spec: ModelSpec,
    final: Path,
    *,
    urlopen: Callable[..., Any] = urllib.request.urlopen,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> tuple[str, int]:
    """Fetch `spec.url` into `final`; return (sha256, bytes). On any failure (network, short or
    oversized transfer, wrong hash) nothing is left behind and `final` is untouched."""
    assert spec.url is not None
    request = urllib.request.Request(spec.url, headers={"User-Agent": USER_AGENT})
    with temp_beside(final) as (temp, handle):
        try:
            with urlopen(request, timeout=timeout) as response:
                announced = content_length(response)
                total = announced if announced is not None else spec.bytes
                sha, size = hash_stream(response, handle, progress, total)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise DownloadError(
                f"{spec.id}: download from {spec.url} failed: {describe_failure(exc)}"
            ) from exc
        # urllib does not notice a body shorter than its Content-Length: count ourselves.
        for expected_size in (announced, spec.bytes):
            if expected_size is not None and size != expected_size:
                raise DownloadError(
                    f"{spec.id}: transfer from {spec.url} cut short or oversized: "
                    f"got {size} bytes, expected {expected_size}"
                )
        if spec.sha256 is not None:
            check_sha256(f"{spec.id} (downloaded from {spec.url})", spec.sha256, sha)
        replace_durably(handle, temp, final)
    return sha, size
