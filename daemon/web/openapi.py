"""The HTTP API's OpenAPI 3.1 description, served at /api/openapi.json (tests check that every
route the application serves under /api is described here)."""

from __future__ import annotations

from typing import Any

__all__ = ["OPENAPI"]

_ERROR = {
    "description": "Refused; nothing changed",
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"error": {"type": "string"}}}
        }
    },
}
_ID = {"name": "output_id", "in": "path", "required": True, "schema": {"type": "integer"}}
_JOB = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "integer"}}
_CSRF = {"name": "X-CSRF-Token", "in": "header", "required": False, "schema": {"type": "string"}}


def _json(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {}}}}


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": properties,
                    "required": required,
                }
            }
        },
    }


_REFUSALS = {str(code): _ERROR for code in (400, 401, 403, 404, 409, 413, 415, 422)}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "scanrestore",
        "version": "1",
        "description": (
            "The state of a scanrestore daemon and curators' review decisions. A server bound "
            "to an address other than loopback requires `Authorization: Bearer TOKEN`; a "
            "browser session instead sends the X-CSRF-Token header equal to the "
            "scanrestore_csrf cookie with every POST."
        ),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}, {}],
    "paths": {
        "/api/status": {
            "get": {
                "summary": "Queue counts, running jobs, throughput, window, failures, fixity, "
                "models",
                "responses": {"200": _json("The daemon's status"), **_REFUSALS},
            }
        },
        "/api/outputs": {
            "get": {
                "summary": "Published images with their review state",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"enum": ["awaiting", "approved", "rejected"]},
                    },
                    {"name": "folder", "in": "query", "schema": {"type": "string"}},
                    {"name": "preset", "in": "query", "schema": {"type": "string"}},
                    {"name": "stage", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "sort",
                        "in": "query",
                        "schema": {"enum": ["oldest", "newest", "invented"]},
                    },
                ],
                "responses": {"200": _json("{outputs: [...]}"), **_REFUSALS},
            }
        },
        "/api/outputs/{output_id}": {
            "get": {
                "summary": "One published image with its full provenance and reviews",
                "parameters": [_ID],
                "responses": {"200": _json("The output"), **_REFUSALS},
            }
        },
        "/api/outputs/{output_id}/review": {
            "post": {
                "summary": "Record a review decision (append-only)",
                "parameters": [_ID, _CSRF],
                "requestBody": _body(
                    {
                        "decision": {"enum": ["approved", "rejected"]},
                        "note": {"type": "string", "maxLength": 4000},
                        "reviewer": {"type": "string", "minLength": 1, "maxLength": 200},
                    },
                    ["decision"],
                ),
                "responses": {"200": _json("The recorded review event"), **_REFUSALS},
            }
        },
        "/api/outputs/{output_id}/reprocess": {
            "post": {
                "summary": "Queue the output's source for a new version (optionally another "
                "preset)",
                "parameters": [_ID, _CSRF],
                "requestBody": _body({"preset": {"type": "string"}}, []),
                "responses": {"200": _json("The queued job"), **_REFUSALS},
            }
        },
        "/api/outputs/{output_id}/image/{layer}": {
            "get": {
                "summary": "An 8-bit sRGB PNG preview: an overview, or a crop in output pixels",
                "parameters": [
                    _ID,
                    {
                        "name": "layer",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": ["output", "original", "lanczos", "mask"]},
                    },
                    *(
                        {"name": k, "in": "query", "schema": {"type": "integer", "minimum": 0}}
                        for k in ("x", "y", "w", "h", "width")
                    ),
                ],
                "responses": {
                    "200": {"description": "PNG", "content": {"image/png": {}}},
                    **_REFUSALS,
                },
            }
        },
        "/api/jobs/{job_id}/retry": {
            "post": {
                "summary": "Queue a failed or quarantined file again",
                "parameters": [_JOB, _CSRF],
                "requestBody": _body({}, []),
                "responses": {"200": _json("The jobs queued again"), **_REFUSALS},
            }
        },
        "/api/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json("OpenAPI 3.1")}}
        },
    },
}
