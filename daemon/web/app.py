"""The review page and the HTTP API as one Starlette application. Handlers are thin: they take ids
(never paths) from requests, call the same store, queue and action functions as the CLI, and
answer anything they cannot honour with a clean 4xx that changes nothing."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from daemon import actions
from daemon.config import Config
from daemon.store import DECISIONS, REVIEW_STATES, UnknownReferenceError
from daemon.web import metrics, previews
from daemon.web.openapi import OPENAPI
from daemon.web.previews import PreviewError, Region
from daemon.web.security import (
    CSRF_COOKIE,
    MAX_BODY,
    SESSION_COOKIE,
    BadRequest,
    Guard,
    is_loopback,
    new_csrf,
    read_json,
    session_value,
)
from daemon.web.views import Roots, Site
from pipeline.errors import ModelError

__all__ = ["create_app"]

_SORTS = ("invented", "oldest", "newest")
_LAYERS = ("output", "original", "lanczos", "mask")
_MAX_TEXT = 1000


def create_app(config: Config, roots: Roots, *, token: str, host: str) -> Starlette:
    site = Site(config, roots)
    templates = Environment(
        loader=PackageLoader("daemon.web", "templates"),
        autoescape=select_autoescape(("html",)),
    )
    collector = metrics.Metrics(site)

    def page(name: str, request: Request, **values: Any) -> HTMLResponse:
        csrf = request.cookies.get(CSRF_COOKIE) or new_csrf()
        html = templates.get_template(name).render(csrf=csrf, signed_in=bool(token), **values)
        response = HTMLResponse(html)
        if request.cookies.get(CSRF_COOKIE) != csrf:
            response.set_cookie(CSRF_COOKIE, csrf, httponly=False, samesite="strict")
        return response

    def api(handler: Callable[..., Any]) -> Callable[[Request], Awaitable[Response]]:
        """A JSON endpoint whose body (if any) is read first, then run in a worker thread with
        its own connection; BadRequest and unknown ids become 4xx answers."""

        async def endpoint(request: Request) -> Response:
            try:
                body = await read_json(request) if request.method == "POST" else None
                result = await run_in_threadpool(handler, request, body)
            except BadRequest as exc:
                return JSONResponse({"error": exc.reason}, status_code=exc.status)
            except (UnknownReferenceError, KeyError) as exc:
                return JSONResponse({"error": str(exc).strip("'\"")}, status_code=404)
            return result if isinstance(result, Response) else JSONResponse(result)

        return endpoint

    # ------------------------------------------------------------------ API

    def status(request: Request, _body: None) -> dict[str, Any]:
        return site.status()

    def outputs(request: Request, _body: None) -> dict[str, Any]:
        query = request.query_params
        unknown = set(query) - {"state", "folder", "preset", "stage", "sort"}
        if unknown:
            raise BadRequest(400, f"unknown query parameter {sorted(unknown)[0]!r}")
        state = _choice(query.get("state"), REVIEW_STATES, "state")
        sort = _choice(query.get("sort"), _SORTS, "sort") or "oldest"
        folder, preset, stage = (_text(query.get(k), k) for k in ("folder", "preset", "stage"))
        rows = site.listing(state=state, folder=folder, preset=preset, stage=stage, sort=sort)
        return {"outputs": rows}

    def output(request: Request, _body: None) -> dict[str, Any]:
        found = site.output(request.path_params["output_id"])
        if found is None:
            raise BadRequest(404, f"no published image {request.path_params['output_id']}")
        return found

    def review(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        _only(body, {"decision", "note", "reviewer"})
        decision = body.get("decision")
        if decision not in DECISIONS:
            raise BadRequest(422, f"decision must be one of {', '.join(DECISIONS)}")
        note = body.get("note", "")
        reviewer = body.get("reviewer", "curator")
        if not isinstance(note, str) or not isinstance(reviewer, str):
            raise BadRequest(422, "note and reviewer must be strings")
        store, _ = site.state()
        try:
            done = actions.review(
                store, request.path_params["output_id"], decision, reviewer=reviewer, note=note
            )
        except ValueError as exc:
            raise BadRequest(422, str(exc)) from None
        return done.as_json()

    def reprocess(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        _only(body, {"preset"})
        preset = body.get("preset")
        if preset is not None and (
            not isinstance(preset, str) or preset not in config.presets_all()
        ):
            raise BadRequest(
                422, f"preset must be one of {', '.join(sorted(config.presets_all()))}"
            )
        store, queue = site.state()
        image = store.published_image(request.path_params["output_id"])
        if image is None:
            raise BadRequest(404, f"no published image {request.path_params['output_id']}")
        try:
            done = actions.reprocess(config, store, queue, image.source_path, preset)
        except (actions.ActionError, ModelError) as exc:
            raise BadRequest(409, str(exc)) from None
        return done.as_json()

    def retry(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        _only(body, set())
        _store, queue = site.state()
        job = queue.get(request.path_params["job_id"])
        if job.state not in ("failed", "quarantined"):
            raise BadRequest(409, f"job {job.id} is {job.state}: only failed or quarantined retry")
        jobs = actions.retry(queue, job.path)
        return {"queued": [{"job": j.id, "path": j.path} for j in jobs]}

    def image(request: Request, _body: None) -> Response:
        layer = request.path_params["layer"]
        if layer not in _LAYERS:
            raise BadRequest(404, f"no layer {layer!r} (one of {', '.join(_LAYERS)})")
        store, _ = site.state()
        found = store.published_image(request.path_params["output_id"])
        if found is None:
            raise BadRequest(404, f"no published image {request.path_params['output_id']}")
        try:
            size = site.previews.size(site.output_file(found.path))
            region, width = _region(request, size)
            pixels = _layer_pixels(site, store, found, layer, overview=region is None)
            resample = Image.Resampling.NEAREST if layer == "original" else None
            if region is None:
                view = previews.fit(*size, width or previews.OVERVIEW_PX)
                kind = Image.Resampling.LANCZOS if resample is None else resample
                picture = previews.overview(pixels, view, kind)
            else:
                target = None if width is None else previews.fit(region.w, region.h, width)
                picture = previews.crop(pixels, region, size, resample, target)
        except PreviewError as exc:
            raise BadRequest(422, str(exc)) from None
        if layer == "mask":  # invented pixels in magenta, the rest transparent
            alpha = picture.convert("L")
            picture = Image.new("RGBA", alpha.size, (255, 0, 255, 0))
            picture.putalpha(alpha)
        return Response(
            previews.png(picture),
            media_type="image/png",
            headers={"cache-control": "private, max-age=3600"},
        )

    # ------------------------------------------------------------------ pages

    async def dashboard(request: Request) -> Response:
        return page("dashboard.html", request, status=await run_in_threadpool(site.status))

    async def review_page(request: Request) -> Response:
        return page(
            "review.html", request, states=REVIEW_STATES, presets=sorted(config.presets_all())
        )

    async def output_page(request: Request) -> Response:
        found = await run_in_threadpool(site.output, request.path_params["output_id"])
        if found is None:
            raise HTTPException(404, "no such output")
        return page("output.html", request, output=found)

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return page("login.html", request, failed=False)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return JSONResponse({"error": "request body too large"}, status_code=413)
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
        given = (form.get("token") or [""])[0]
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            return page("login.html", request, failed=True)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session_value(token), httponly=True, samesite="strict")
        return response

    async def metrics_endpoint(request: Request) -> Response:
        body = await run_in_threadpool(collector.render)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        detail = getattr(exc, "detail", "not found")
        return JSONResponse({"error": detail}, status_code=status)

    static = Path(__file__).parent / "static"
    routes = [
        Route("/", dashboard),
        Route("/review", review_page),
        Route("/outputs/{output_id:int}", output_page),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/metrics", metrics_endpoint),
        Route("/api/openapi.json", openapi),
        Route("/api/status", api(status)),
        Route("/api/outputs", api(outputs)),
        Route("/api/outputs/{output_id:int}", api(output)),
        Route("/api/outputs/{output_id:int}/review", api(review), methods=["POST"]),
        Route("/api/outputs/{output_id:int}/reprocess", api(reprocess), methods=["POST"]),
        Route("/api/outputs/{output_id:int}/image/{layer}", api(image)),
        Route("/api/jobs/{job_id:int}/retry", api(retry), methods=["POST"]),
        Mount("/static", StaticFiles(directory=static), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: not_found},
    )
    allowed = ("127.0.0.1", "localhost", "::1") if is_loopback(host) else ()
    app.add_middleware(Guard, token=token, allowed_hosts=allowed)
    return app


def _choice(value: str | None, allowed: tuple[str, ...], name: str) -> str | None:
    if value is None or value == "":
        return None
    if value not in allowed:
        raise BadRequest(400, f"{name} must be one of {', '.join(allowed)}")
    return value


def _text(value: str | None, name: str) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > _MAX_TEXT or "\x00" in value:
        raise BadRequest(400, f"{name} is too long or holds a NUL")
    return value


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(422, f"unknown field {sorted(unknown)[0]!r}")


def _layer_pixels(site: Site, store: Any, found: Any, layer: str, *, overview: bool) -> Any:
    """A layer's cached pixels: its overview, or its full size for a crop."""
    read = site.previews.overview if overview else site.previews.pixels
    if layer == "output":
        return read(site.output_file(found.path), found.output_sha256)
    if layer == "mask":
        mask = next((o for _, o in store.run_outputs(found.run_id) if o.kind == "mask"), None)
        if mask is None:
            raise BadRequest(404, f"output {found.output_id} has no invented-pixel mask")
        return read(site.output_file(mask.path), mask.output_sha256, mask=True)
    return read(site.source_file(found), found.source_sha256)


def _region(request: Request, size: tuple[int, int]) -> tuple[Region | None, int | None]:
    """The crop (x, y, w, h in output pixels) and the width asked for, checked."""
    query = request.query_params
    unknown = set(query) - {"x", "y", "w", "h", "width"}
    if unknown:
        raise BadRequest(400, f"unknown query parameter {sorted(unknown)[0]!r}")
    values = {}
    for key in ("x", "y", "w", "h", "width"):
        if key in query:
            if not query[key].isdigit() or len(query[key]) > 7:
                raise BadRequest(400, f"{key} must be a whole number of pixels")
            values[key] = int(query[key])
    width = values.get("width")
    if width is not None and not 1 <= width <= previews.MAX_CROP_PX:
        raise BadRequest(400, f"width must be 1 to {previews.MAX_CROP_PX}")
    box = [values.get(k) for k in ("x", "y", "w", "h")]
    if all(v is None for v in box):
        return None, width
    if any(v is None for v in box):
        raise BadRequest(400, "a crop needs x, y, w and h")
    x, y, w, h = box  # type: ignore[misc]
    if w < 1 or h < 1 or max(w, h) > 4 * previews.MAX_CROP_PX:
        raise BadRequest(400, f"w and h must be 1 to {4 * previews.MAX_CROP_PX}")
    if x + w > size[0] or y + h > size[1]:
        raise BadRequest(400, f"crop leaves the {size[0]}x{size[1]} output")
    if width is None and max(w, h) > previews.MAX_CROP_PX:
        width = previews.MAX_CROP_PX
    return Region(x, y, w, h), width
