"""Tests for pipeline.models: registry, fetching over real HTTP, import, verify, resolve, load."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from modelfactory import (
    random_defectunet,
    random_parsenet,
    random_retinaface,
    tiny_compact,
    tiny_dncnn,
    tiny_ffdnet,
    tiny_rrdbnet,
)

from pipeline.errors import (
    ArchitectureMismatchError,
    DownloadError,
    HashMismatchError,
    ModelError,
    ModelNotAvailableError,
    UnknownModelError,
)
from pipeline.files import sha256_file
from pipeline.models import (
    REGISTRY,
    ModelSpec,
    ModelStore,
    build_registry,
    default_cache_dir,
)

SHARED_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights"
needs_shared = pytest.mark.skipif(
    not SHARED_WEIGHTS.is_dir(), reason=f"real weights folder {SHARED_WEIGHTS} is not present"
)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (the HTTP server must be shut down)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads leaked: {leaked}"


class _Route:
    def __init__(self, body: bytes, *, status: int = 200, declared: int | None = None) -> None:
        self.body = body
        self.status = status
        self.declared = len(body) if declared is None else declared
        self.hang = False


class _JoiningServer(http.server.ThreadingHTTPServer):
    # Non-daemon handler threads are joined by server_close(), so none outlives the fixture
    # (the thread-leak guard in conftest would otherwise race a handler that is still exiting).
    daemon_threads = False
    block_on_close = True


class FileServer:
    """A real HTTP server on 127.0.0.1 standing in for GitHub's release downloads."""

    def __init__(self) -> None:
        self.routes: dict[str, _Route] = {}
        self.hits: dict[str, int] = {}
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                if route.hang:  # accept the connection, then say nothing until released
                    server.release.wait(10)
                    return
                self.send_response(route.status)
                self.send_header("Content-Length", str(route.declared))
                self.end_headers()
                # With a declared length above the body's, closing now is a truncated transfer.
                self.wfile.write(route.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = _JoiningServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), name="file-server"
        )

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"

    def serve(self, name: str, body: bytes, **kwargs: int) -> _Route:
        self.routes[f"/{name}"] = route = _Route(body, **kwargs)
        return route


@pytest.fixture
def server() -> Iterator[FileServer]:
    files = FileServer()
    files.thread.start()
    try:
        yield files
    finally:
        files.release.set()
        files.httpd.shutdown()
        files.httpd.server_close()
        files.thread.join(5)


def official(model_id: str, body_or_path: bytes | Path, url: str | None, **overrides) -> ModelSpec:
    """An official-looking spec whose hash and size are those of the given bytes or file."""
    body = body_or_path.read_bytes() if isinstance(body_or_path, Path) else body_or_path
    fields = dict(
        id=model_id,
        url=url,
        sha256=hashlib.sha256(body).hexdigest(),
        bytes=len(body),
        architecture="ESRGAN",
        scale=4,
        purpose="upscale",
        licence="BSD-3-Clause",
        filename=f"{model_id}.pth",
    )
    fields.update(overrides)
    return ModelSpec(**fields)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def x4_file(tmp_path: Path) -> Path:
    return tiny_rrdbnet(tmp_path / "src" / "tiny_x4.pth", scale=4)


# --- registry --------------------------------------------------------------------------------


def _manifest_rows() -> dict[str, tuple[str, int | None, str | None]]:
    text = (SHARED_WEIGHTS / "MANIFEST.md").read_text(encoding="utf-8")
    table = text.split("## Official download sources", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("https://"):
            continue
        _, url, size, sha = cells
        rows[url] = (
            url,
            int(size) if size.isdigit() else None,
            sha if re.fullmatch(r"[0-9a-f]{64}", sha) else None,
        )
    return rows


@needs_shared
def test_registry_urls_sizes_and_hashes_match_the_manifest() -> None:
    rows = _manifest_rows()
    assert len(rows) == 12
    assert {spec.url for spec in REGISTRY.values()} == set(rows)
    for spec in REGISTRY.values():
        assert (spec.url, spec.bytes, spec.sha256) == rows[spec.url], spec.id
        assert spec.filename == spec.url.rsplit("/", 1)[1], spec.id


@needs_shared
def test_rebuilt_ncnn_weights_are_never_labelled_official() -> None:
    official_hashes = {spec.sha256 for spec in REGISTRY.values()}
    rebuilt = sorted(SHARED_WEIGHTS.glob("*.from-ncnn.pth"))
    assert rebuilt, f"no *.from-ncnn.pth in {SHARED_WEIGHTS}"
    for path in rebuilt:
        assert sha256_file(path) not in official_hashes, path.name


def test_registry_architectures_are_ids_spandrel_or_our_builders_know() -> None:
    import spandrel

    for spec in REGISTRY.values():
        if spec.loader == "spandrel":
            assert spec.architecture in spandrel.MAIN_REGISTRY, spec.id
        else:
            assert spec.architecture in {"RetinaFace", "ParseNet"}, spec.id
    assert REGISTRY["restoreformer"].sha256 is None
    assert REGISTRY["realesrgan-x2plus"].scale == 2


def test_build_registry_rejects_duplicate_ids_and_hashes(x4_file: Path) -> None:
    first = official("a", x4_file, None)
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        build_registry(first, dataclasses.replace(first, filename="other.pth", sha256=None))
    with pytest.raises(ValueError, match="duplicate sha256"):
        build_registry(first, dataclasses.replace(first, id="b", filename="b.pth"))


def test_model_spec_rejects_malformed_hash_and_purpose() -> None:
    with pytest.raises(ValueError, match="sha256"):
        dataclasses.replace(REGISTRY["parsenet"], sha256="ABC")
    with pytest.raises(ValueError, match="purpose"):
        dataclasses.replace(REGISTRY["parsenet"], purpose="colourise")


def test_default_cache_dir_prefers_explicit_then_xdg_then_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SCANRESTORE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SCANRESTORE_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "scanrestore" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "scanrestore" / "models"


# --- fetch -----------------------------------------------------------------------------------


def test_fetch_downloads_verifies_and_leaves_no_temp_files(
    server: FileServer, tmp_path: Path, x4_file: Path
) -> None:
    body = x4_file.read_bytes()
    server.serve("x4.pth", body)
    spec = official("tiny-x4", body, server.url("x4.pth"))
    store = ModelStore(tmp_path / "cache", build_registry(spec))
    seen: list[tuple[int, int | None]] = []

    path = store.fetch("tiny-x4", progress=lambda done, total: seen.append((done, total)))

    assert path == tmp_path / "cache" / "tiny-x4.pth"
    assert path.read_bytes() == body
    assert leftovers(tmp_path / "cache") == ["tiny-x4.pth"]
    assert seen[-1] == (len(body), len(body))


def test_auto_fetch_downloads_a_missing_official_model_on_first_use(
    server: FileServer, tmp_path: Path, x4_file: Path
) -> None:
    body = x4_file.read_bytes()
    server.serve("x4.pth", body)
    registry = build_registry(official("tiny-x4", body, server.url("x4.pth")))
    with pytest.raises(ModelNotAvailableError, match="scanrestore models fetch tiny-x4"):
        ModelStore(tmp_path / "off", registry).resolve("tiny-x4")
    assert server.hits == {}

    resolved = ModelStore(tmp_path / "cache", registry, auto_fetch=True).resolve("tiny-x4")

    assert resolved.path.read_bytes() == body
    assert server.hits == {"/x4.pth": 1}


def test_fetch_does_not_download_again_when_a_valid_copy_is_cached(
    server: FileServer, tmp_path: Path, x4_file: Path
) -> None:
    body = x4_file.read_bytes()
    server.serve("x4.pth", body)
    store = ModelStore(tmp_path, build_registry(official("tiny-x4", body, server.url("x4.pth"))))
    store.fetch("tiny-x4")
    store.fetch("tiny-x4")
    assert server.hits["/x4.pth"] == 1


def test_fetch_replaces_a_corrupt_cached_copy(
    server: FileServer, tmp_path: Path, x4_file: Path
) -> None:
    body = x4_file.read_bytes()
    server.serve("x4.pth", body)
    store = ModelStore(tmp_path, build_registry(official("tiny-x4", body, server.url("x4.pth"))))
    (tmp_path / "tiny-x4.pth").write_bytes(b"rot" + body[3:])
    assert store.fetch("tiny-x4").read_bytes() == body


def test_fetch_with_wrong_hash_names_both_hashes_and_leaves_nothing(
    server: FileServer, tmp_path: Path
) -> None:
    server.serve("x4.pth", b"not the weights you are looking for")
    spec = official("tiny-x4", b"the real weights", server.url("x4.pth"), bytes=None)
    cache = tmp_path / "cache"
    store = ModelStore(cache, build_registry(spec))

    with pytest.raises(HashMismatchError) as caught:
        store.fetch("tiny-x4")

    actual = hashlib.sha256(b"not the weights you are looking for").hexdigest()
    message = str(caught.value)
    assert spec.sha256 in message and actual in message and "tiny-x4" in message
    assert (caught.value.expected, caught.value.actual) == (spec.sha256, actual)
    assert leftovers(cache) == []


def test_fetch_of_a_truncated_transfer_raises_and_leaves_nothing(
    server: FileServer, tmp_path: Path, x4_file: Path
) -> None:
    body = x4_file.read_bytes()
    server.serve("x4.pth", body[:1000], declared=len(body))
    spec = official("tiny-x4", body, server.url("x4.pth"), bytes=None)
    store = ModelStore(tmp_path / "cache", build_registry(spec))

    with pytest.raises(DownloadError, match=f"got 1000 bytes, expected {len(body)}"):
        store.fetch("tiny-x4")
    assert leftovers(tmp_path / "cache") == []


def test_fetch_reports_http_errors_as_download_errors(server: FileServer, tmp_path: Path) -> None:
    spec = official("gone", b"x", server.url("missing.pth"))
    store = ModelStore(tmp_path / "cache", build_registry(spec))
    with pytest.raises(DownloadError, match=r"gone: download from .*missing\.pth failed: HTTP 404"):
        store.fetch("gone")
    assert leftovers(tmp_path / "cache") == []


def test_fetch_gives_up_on_a_silent_server_after_the_timeout(
    server: FileServer, tmp_path: Path
) -> None:
    server.serve("slow.pth", b"x").hang = True
    spec = official("slow", b"x", server.url("slow.pth"))
    store = ModelStore(tmp_path / "cache", build_registry(spec), timeout=0.3)
    with pytest.raises(DownloadError, match=r"slow: download .* failed: .*timed out"):
        store.fetch("slow")
    assert leftovers(tmp_path / "cache") == []


def test_fetch_pins_the_hash_of_a_model_with_none_published(
    server: FileServer, tmp_path: Path, x4_file: Path
) -> None:
    body = x4_file.read_bytes()
    server.serve("rf.pth", body)
    spec = official("unpinned", body, server.url("rf.pth"), sha256=None, bytes=None)
    registry = build_registry(spec)
    store = ModelStore(tmp_path, registry)
    with pytest.raises(ModelNotAvailableError, match="no sha256 is published or pinned"):
        store.resolve("unpinned")

    store.fetch("unpinned")

    again = ModelStore(tmp_path, registry)
    assert again.spec("unpinned").sha256 == hashlib.sha256(body).hexdigest()
    assert [r.status for r in again.verify()] == ["ok"]
    assert again.load("unpinned").descriptor.scale == 4


def test_fetch_refuses_custom_models_and_unknown_ids(tmp_path: Path, x4_file: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    store.import_file(x4_file, model_id="mine")
    with pytest.raises(ModelError, match="mine: custom models have no download URL"):
        store.fetch("mine")
    with pytest.raises(UnknownModelError, match="'nope' is not a known model id"):
        store.fetch("nope")


# --- import ----------------------------------------------------------------------------------


def test_import_of_a_file_with_a_registry_hash_stores_it_under_the_official_id(
    tmp_path: Path, x4_file: Path
) -> None:
    store = ModelStore(tmp_path / "cache", build_registry(official("tiny-x4", x4_file, None)))
    spec = store.import_file(x4_file, model_id="whatever")
    assert spec.id == "tiny-x4" and spec.origin == "official"
    assert (tmp_path / "cache" / "tiny-x4.pth").read_bytes() == x4_file.read_bytes()
    assert leftovers(tmp_path / "cache") == [".models.json.lock", "tiny-x4.pth"]


def test_import_of_an_unknown_file_records_a_custom_model_that_persists(
    tmp_path: Path, x4_file: Path
) -> None:
    cache = tmp_path / "cache"
    spec = ModelStore(cache).import_file(x4_file, model_id="my-x4", licence="CC-BY-4.0")

    assert (spec.id, spec.origin, spec.architecture, spec.scale) == ("my-x4", "custom", "ESRGAN", 4)
    assert (spec.purpose, spec.sha256, spec.bytes) == (
        "upscale",
        sha256_file(x4_file),
        x4_file.stat().st_size,
    )
    assert spec.licence == "CC-BY-4.0"
    reopened = ModelStore(cache)
    assert reopened.spec("my-x4") == spec
    assert (reopened.resolve("my-x4").path, reopened.resolve("my-x4").sha256) == (
        cache / "custom" / "my-x4.pth",
        spec.sha256,
    )
    assert not [name for name in leftovers(cache) if ".part-" in name]


def test_import_of_an_unknown_file_needs_an_id(tmp_path: Path, x4_file: Path) -> None:
    with pytest.raises(ModelError, match=f"{sha256_file(x4_file)} matches no known model"):
        ModelStore(tmp_path / "cache").import_file(x4_file)
    assert leftovers(tmp_path / "cache") == [".models.json.lock"]


def test_import_refuses_an_official_id_for_a_different_file(tmp_path: Path, x4_file: Path) -> None:
    with pytest.raises(HashMismatchError) as caught:
        ModelStore(tmp_path / "cache").import_file(x4_file, model_id="realesrgan-x4plus")
    assert caught.value.expected == REGISTRY["realesrgan-x4plus"].sha256
    assert caught.value.actual == sha256_file(x4_file)
    assert "realesrgan-x4plus" in str(caught.value)


def test_import_refuses_a_custom_id_that_names_another_file(tmp_path: Path, x4_file: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    first = store.import_file(x4_file, model_id="mine")
    other = tiny_compact(tmp_path / "other.pth")
    with pytest.raises(ModelError, match=f"'mine' already names another file .*{first.sha256}"):
        store.import_file(other, model_id="mine")
    assert store.spec("mine") == first
    assert store.import_file(x4_file, model_id="mine") == first  # same bytes again: a no-op


def test_import_refuses_ids_that_are_not_safe_file_names(tmp_path: Path, x4_file: Path) -> None:
    for bad in ("../escape", "file:x", "", "-dash-first"):
        with pytest.raises(ModelError, match="custom ids are"):
            ModelStore(tmp_path / "cache").import_file(x4_file, model_id=bad)


def test_import_refuses_a_file_no_loader_recognises(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    torch.save({"some.weight": torch.zeros(3)}, junk)
    with pytest.raises(ArchitectureMismatchError, match="spandrel recognises no architecture"):
        ModelStore(tmp_path / "cache").import_file(junk, model_id="junk")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match="not a loadable weights file"):
        ModelStore(tmp_path / "cache").import_file(noise, model_id="noise")
    assert leftovers(tmp_path / "cache") == [".models.json.lock"]


class _Exploit:
    """Unpickling this with a plain unpickler runs code: it writes the file named at pickling."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


def test_import_never_executes_code_hidden_in_a_pickle(tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pth"
    torch.save({"params_ema": _Exploit(target)}, evil)
    torch.load(evil, weights_only=False)  # proves the exploit is live with an unsafe loader
    assert target.read_text() == "pwned"
    target.unlink()

    with pytest.raises(ModelError, match="not a loadable weights file"):
        ModelStore(tmp_path / "cache").import_file(evil, model_id="evil")
    with pytest.raises(ModelError, match="not a loadable weights file"):
        ModelStore(tmp_path / "cache").load(evil)
    assert not target.exists()


def test_import_pins_an_official_model_without_published_hash_if_architecture_fits(
    tmp_path: Path, x4_file: Path
) -> None:
    spec = official("rf", x4_file, None, sha256=None, bytes=None)
    store = ModelStore(tmp_path / "cache", build_registry(spec))
    with pytest.raises(ArchitectureMismatchError, match="rf is ESRGAN x4, this file is Compact x4"):
        store.import_file(tiny_compact(tmp_path / "c.pth"), model_id="rf")

    pinned = store.import_file(x4_file, model_id="rf")

    assert (pinned.id, pinned.sha256, pinned.origin) == ("rf", sha256_file(x4_file), "official")
    with pytest.raises(HashMismatchError):
        store.import_file(tiny_rrdbnet(tmp_path / "other.pth", seed=1), model_id="rf")


def test_remove_forgets_a_custom_model_so_its_id_can_be_reused(
    tmp_path: Path, x4_file: Path
) -> None:
    store = ModelStore(tmp_path / "cache")
    store.import_file(x4_file, model_id="mine")
    store.remove("mine")
    assert "mine" not in store.specs()
    assert not (tmp_path / "cache" / "custom" / "mine.pth").exists()
    replacement = store.import_file(tiny_compact(tmp_path / "c.pth"), model_id="mine")
    assert ModelStore(tmp_path / "cache").spec("mine") == replacement
    with pytest.raises(UnknownModelError):
        store.remove("never-imported")


# --- verify, list, resolve -------------------------------------------------------------------


def test_verify_flags_a_tampered_file_and_a_missing_custom_one(
    tmp_path: Path, x4_file: Path
) -> None:
    cache = tmp_path / "cache"
    store = ModelStore(cache, build_registry(official("tiny-x4", x4_file, None)))
    store.import_file(x4_file)
    store.import_file(tiny_compact(tmp_path / "c.pth"), model_id="compact")
    store.import_file(tiny_dncnn(tmp_path / "d.pth"), model_id="dncnn")
    with open(cache / "tiny-x4.pth", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\xff")
    (cache / "custom" / "dncnn.pth").unlink()

    results = {result.spec.id: result for result in store.verify()}

    assert {key: result.status for key, result in results.items()} == {
        "tiny-x4": "mismatch",
        "compact": "ok",
        "dncnn": "missing",
    }
    assert results["tiny-x4"].actual_sha256 == sha256_file(cache / "tiny-x4.pth")
    assert results["tiny-x4"].expected_sha256 == sha256_file(x4_file)


def test_packaged_weights_verify_load_safely_and_are_never_written_or_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model shipped inside the package (origin "package", as a DefectUNet trained by this
    project would be): `verify` re-hashes it, it loads through the safe loader, importing the
    same bytes never writes into the package, fetching downloads nothing, removing is refused."""
    import pipeline.models.store as store_module

    package = tmp_path / "package"
    weights = random_defectunet(package / "defects.safetensors")
    monkeypatch.setattr(store_module, "PACKAGED_WEIGHTS", package)
    spec = official(
        "defects-v0", weights, None, architecture="DefectUNet", scale=1, purpose="defects",
        filename="defects.safetensors", origin="package",
    )  # fmt: skip
    store = ModelStore(tmp_path / "cache", build_registry(spec))
    assert store.path_for(spec) == weights
    assert {s.id: st for s, st in store.list()} == {"defects-v0": "present"}
    (result,) = store.verify()
    assert result.status == "ok" and result.actual_sha256 == sha256_file(weights)
    loaded = store.load("defects-v0")
    assert loaded.descriptor.architecture.id == "DefectUNet" and loaded.sha256 == spec.sha256
    assert loaded.descriptor.input_channels == 1
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(weights.read_bytes())
    before = weights.stat().st_mtime_ns
    assert store.import_file(copy).id == "defects-v0"
    assert (
        weights.stat().st_mtime_ns == before
        and not (tmp_path / "cache" / "defects.safetensors").exists()
    )
    assert store.fetch("defects-v0") == weights
    with pytest.raises(ModelError, match="shipped with scanrestore"):
        store.remove("defects-v0")
    assert weights.is_file()
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert store.verify()[0].status == "mismatch"
    weights.unlink()  # an install that lost its shipped weights
    assert store.verify()[0].status == "missing"


def test_list_reports_presence_without_hashing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    statuses = {spec.id: status for spec, status in store.list()}
    assert set(statuses) == set(REGISTRY) and set(statuses.values()) == {"missing"}
    if (SHARED_WEIGHTS / "dncnn_color_blind.pth").is_file():
        store.import_file(SHARED_WEIGHTS / "dncnn_color_blind.pth")
        assert {s.id: st for s, st in store.list()}["dncnn-color-blind"] == "present"


def test_resolve_explains_unknown_and_unfetched_models(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    with pytest.raises(UnknownModelError, match="'no-such-model' is neither a known model id"):
        store.resolve("no-such-model")
    with pytest.raises(
        ModelNotAvailableError, match=re.escape("scanrestore models fetch gfpgan-1.4")
    ) as e:
        store.resolve("gfpgan-1.4")
    assert "scanrestore models import FILE" in str(e.value)


def test_resolve_accepts_a_file_path_and_records_its_hash(tmp_path: Path, x4_file: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    resolved = store.resolve(str(x4_file))
    assert (resolved.id, resolved.path, resolved.sha256) == (
        "file:tiny_x4.pth",
        x4_file,
        sha256_file(x4_file),
    )
    assert (resolved.spec.architecture, resolved.spec.scale, resolved.spec.origin) == (
        "ESRGAN",
        4,
        "file",
    )
    assert leftovers(tmp_path / "cache") == []  # a path reference is used in place


def test_resolve_of_a_copy_of_a_known_model_keeps_its_official_id(
    tmp_path: Path, x4_file: Path
) -> None:
    store = ModelStore(tmp_path / "cache", build_registry(official("tiny-x4", x4_file, None)))
    resolved = store.resolve(x4_file)
    assert (resolved.id, resolved.path) == ("tiny-x4", x4_file)


# --- load ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "scale", "architecture", "purpose"),
    [
        (functools.partial(tiny_rrdbnet, scale=4), 4, "ESRGAN", "upscale"),
        (functools.partial(tiny_rrdbnet, scale=2), 2, "ESRGAN", "upscale"),
        (functools.partial(tiny_rrdbnet, scale=1), 1, "ESRGAN", "denoise"),
        (functools.partial(tiny_compact, scale=4), 4, "Compact", "upscale"),
        (functools.partial(tiny_compact, scale=2), 2, "Compact", "upscale"),
        (tiny_dncnn, 1, "DnCNN", "denoise"),
    ],
    ids=["rrdb-x4", "rrdb-x2-unshuffle", "rrdb-x1-unshuffle", "compact-x4", "compact-x2", "dncnn"],
)
def test_load_builds_the_detected_architecture_at_its_scale(
    tmp_path: Path, builder: Callable[[Path], Path], scale: int, architecture: str, purpose: str
) -> None:
    path = builder(tmp_path / "m.pth")
    store = ModelStore(tmp_path / "cache")
    spec = store.import_file(path, model_id="m")
    assert (spec.architecture, spec.scale, spec.purpose) == (architecture, scale, purpose)

    loaded = store.load("m")

    assert loaded.descriptor is not None
    assert (str(loaded.descriptor.architecture.id), loaded.descriptor.scale) == (
        architecture,
        scale,
    )
    assert (loaded.id, loaded.sha256, loaded.spec) == ("m", spec.sha256, spec)
    assert not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    with torch.no_grad():
        out = loaded.descriptor(torch.rand(1, 3, 8, 8))
    assert out.shape == (1, 3, 8 * scale, 8 * scale)


@pytest.mark.parametrize(
    ("architecture", "scale", "message"),
    [
        ("ESRGAN", 2, "expected ESRGAN x2, but the weights are ESRGAN x4"),
        ("Compact", 4, "expected Compact x4, but the weights are ESRGAN x4"),
    ],
)
def test_load_refuses_weights_whose_architecture_or_scale_differ_from_the_spec(
    tmp_path: Path, x4_file: Path, architecture: str, scale: int, message: str
) -> None:
    spec = official("claims", x4_file, None, architecture=architecture, scale=scale)
    store = ModelStore(tmp_path / "cache", build_registry(spec))
    store.import_file(x4_file)
    with pytest.raises(ArchitectureMismatchError, match=re.escape(message)) as caught:
        store.load("claims")
    assert "claims" in str(caught.value)


def test_load_refuses_a_tampered_file_by_hash_before_loading_it(
    tmp_path: Path, x4_file: Path
) -> None:
    store = ModelStore(tmp_path / "cache")
    spec = store.import_file(x4_file, model_id="mine")
    # A different but perfectly loadable model in its place: only the hash can tell.
    tiny_rrdbnet(tmp_path / "cache" / "custom" / "mine.pth", seed=7)

    with pytest.raises(HashMismatchError) as caught:
        store.load("mine")

    assert caught.value.expected == spec.sha256
    assert caught.value.actual == sha256_file(tmp_path / "cache" / "custom" / "mine.pth")
    assert "mine" in str(caught.value)
    with pytest.raises(HashMismatchError):
        store.load_state_dict("mine")


def test_load_shares_one_copy_per_hash_device_and_dtype(tmp_path: Path, x4_file: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    store.import_file(x4_file, model_id="mine")

    first = store.load("mine")
    by_path = store.load(tmp_path / "cache" / "custom" / "mine.pth")
    bf16 = store.load("mine", dtype=torch.bfloat16)

    assert store.load("mine") is first
    assert by_path.module is first.module and by_path.id == "mine"
    assert bf16.module is not first.module
    assert next(bf16.module.parameters()).dtype == torch.bfloat16
    assert next(first.module.parameters()).dtype == torch.float32
    store.clear_loaded()
    assert store.load("mine").module is not first.module


def test_concurrent_loads_of_one_model_build_it_once(tmp_path: Path, x4_file: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    store.import_file(x4_file, model_id="mine")
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(store.load("mine"))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(result.module) for result in results}) == 1


def test_load_state_dict_unwraps_upstream_wrappers(tmp_path: Path) -> None:
    from spandrel.architectures.Compact import Compact

    path = tiny_compact(tmp_path / "c.pth")
    store = ModelStore(tmp_path / "cache")
    store.import_file(path, model_id="c")

    tensors, resolved = store.load_state_dict("c")

    expected = torch.load(path, weights_only=True)["params"]
    assert resolved.id == "c"
    assert tensors.keys() == expected.keys() == Compact(num_feat=8, num_conv=2).state_dict().keys()
    assert all(torch.equal(tensors[key], expected[key]) for key in expected)


def test_facexlib_models_import_and_load_as_state_dicts(tmp_path: Path) -> None:
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.parsenet import ParseNet

    store = ModelStore(tmp_path / "cache")
    detector = store.import_file(random_retinaface(tmp_path / "r.pth"), model_id="det")
    parser = store.import_file(random_parsenet(tmp_path / "p.pth"), model_id="parse")

    assert (detector.architecture, detector.variant, detector.loader) == (
        "RetinaFace",
        "mobile0.25",
        "state_dict",
    )
    assert (parser.architecture, parser.purpose) == ("ParseNet", "parse")
    loaded = store.load("det")
    assert isinstance(loaded.module, RetinaFace) and loaded.descriptor is None
    assert not loaded.module.training
    assert isinstance(store.load("parse").module, ParseNet)
    with pytest.raises(ModelError, match="float32 only"):
        store.load("det", dtype=torch.float16)


def test_ffdnet_is_recognised_rather_than_mistaken_for_dncnn(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    spec = store.import_file(tiny_ffdnet(tmp_path / "f.pth"), model_id="ffdnet")
    assert (spec.architecture, spec.variant, spec.loader, spec.purpose) == (
        "FFDNet",
        "color",
        "state_dict",
        "denoise",
    )
    with pytest.raises(ModelError, match=re.escape("use ModelStore.load_state_dict()")):
        store.load("ffdnet")
    tensors, _ = store.load_state_dict("ffdnet")
    assert tensors["model.0.weight"].shape[1] == 13


# --- the real weights ------------------------------------------------------------------------


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "architecture", "tags"),
    [
        ("RealESRGAN_x4plus.from-ncnn.pth", "ESRGAN", ["64nf", "23nb"]),
        ("realesr-general-x4v3.from-ncnn.pth", "Compact", ["64nf", "32nc"]),
    ],
)
def test_real_rebuilt_realesrgan_weights_import_as_custom_x4_models(
    tmp_path: Path, name: str, architecture: str, tags: list[str]
) -> None:
    store = ModelStore(tmp_path / "cache")
    spec = store.import_file(SHARED_WEIGHTS / name, model_id=name.removesuffix(".pth"))

    assert spec.origin == "custom" and spec.id not in REGISTRY
    assert spec.sha256 not in {s.sha256 for s in REGISTRY.values()}
    assert (spec.architecture, spec.scale) == (architecture, 4)
    loaded = store.load(spec.id)
    assert (str(loaded.descriptor.architecture.id), loaded.descriptor.scale) == (architecture, 4)
    assert loaded.descriptor.tags == tags


@needs_shared
@pytest.mark.slow
def test_real_general_v3_and_its_wdn_twin_have_interpolable_state_dicts(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    for name in ("realesr-general-x4v3", "realesr-general-wdn-x4v3"):
        store.import_file(SHARED_WEIGHTS / f"{name}.from-ncnn.pth", model_id=f"{name}-ncnn")
    general, _ = store.load_state_dict("realesr-general-x4v3-ncnn")
    weak, _ = store.load_state_dict("realesr-general-wdn-x4v3-ncnn")
    assert general.keys() == weak.keys()
    assert all(general[k].shape == weak[k].shape for k in general)
    assert not all(torch.equal(general[k], weak[k]) for k in general)


@needs_shared
@pytest.mark.slow
def test_real_official_files_import_under_their_official_ids_and_load(tmp_path: Path) -> None:
    from facexlib.detection.retinaface import RetinaFace

    store = ModelStore(tmp_path / "cache")
    detector = store.import_file(SHARED_WEIGHTS / "detection_mobilenet0.25_Final.pth")
    denoiser = store.import_file(SHARED_WEIGHTS / "dncnn_color_blind.pth", model_id="ignored")

    assert (detector.id, denoiser.id) == ("retinaface-mobilenet0.25", "dncnn-color-blind")
    assert isinstance(store.load("retinaface-mobilenet0.25").module, RetinaFace)
    loaded = store.load("dncnn-color-blind")
    assert (str(loaded.descriptor.architecture.id), loaded.descriptor.input_channels) == (
        "DnCNN",
        3,
    )
    assert [r.status for r in store.verify()] == ["ok", "ok"]


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "architecture", "variant"),
    [
        ("dncnn_gray_blind.pth", "DnCNN", None),
        ("dncnn_25.pth", "DnCNN", None),
        ("ffdnet_color.pth", "FFDNet", "color"),
    ],
)
def test_real_kair_weights_without_registry_entries_import_as_custom(
    tmp_path: Path, name: str, architecture: str, variant: str | None
) -> None:
    spec = ModelStore(tmp_path / "cache").import_file(SHARED_WEIGHTS / name, model_id=name[:-4])
    assert (spec.architecture, spec.variant, spec.scale, spec.purpose) == (
        architecture,
        variant,
        1,
        "denoise",
    )
