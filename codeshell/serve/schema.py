"""The server's OpenAPI description (`GET /openapi.json`, browsable at `/docs`).

The routes read and validate their bodies themselves (`http.read_model`: body limit, strict
UTF-8, errors in each API family's shape), so FastAPI cannot infer the request bodies from
the handlers' signatures. Each route instead declares its body with `request_body(Model)`,
its answers with `json_response` / `sse_response` / `error_responses`, and `install` adds
every model so referenced to the schema's components. This module describes; it validates
nothing and changes no route's behaviour.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

SEED = {"minimum": -(2**63), "maximum": 2**63 - 1}  # the seed range every route checks (service.py)


class Out(BaseModel):
    """Base of the response models: documentation of what the routes send (plain dicts)."""
    model_config = ConfigDict(extra="allow")


def doc(default, **bounds):
    """A field whose JSON schema states the range the routes check (with their own messages, in
    each API family's error shape); pydantic itself does not enforce it."""
    return Field(default, json_schema_extra=bounds)


_REF = "#/components/schemas/{model}"
_MODELS: dict[str, type[BaseModel]] = {}  # models referenced by hand, by component name


def _ref(model: type[BaseModel]) -> dict:
    name = model.__name__
    if _MODELS.setdefault(name, model) is not model:
        raise ValueError(f"two schema models are named {name}")
    return {"$ref": _REF.format(model=name)}


def request_body(model: type[BaseModel], description: str | None = None) -> dict:
    """`openapi_extra` of a route whose JSON body is `model`."""
    body: dict[str, Any] = {"required": True, "content": {"application/json": {"schema": _ref(model)}}}
    if description:
        body["description"] = description
    return {"requestBody": body}


def json_response(model: type[BaseModel], description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def sse_response(event: type[BaseModel], description: str) -> dict:
    """A `text/event-stream` answer: each event is `data: <JSON of event>` and a blank line."""
    return {"description": f"{description} (server-sent events; each `data:` line holds one JSON "
                           f"`{event.__name__}`)",
            "content": {"text/event-stream": {"schema": {"type": "string"}, "x-event-schema": _ref(event)}}}


def both_responses(model: type[BaseModel], event: type[BaseModel], description: str) -> dict:
    """JSON when not streamed, server-sent events when `stream` is true."""
    r = json_response(model, description)
    r["content"].update(sse_response(event, description)["content"])
    return r


def error_responses(model: type[BaseModel], *statuses: int) -> dict[int, dict]:
    words = {400: "bad input", 401: "no valid API key", 404: "unknown model or path", 413: "body over the limit",
             422: "bad input", 499: "the client closed the connection", 503: "loading, busy or shutting down"}
    return {s: json_response(model, words.get(s, "error")) for s in statuses}


def install(app: FastAPI, *, description: str, bearer: bool, model_name: str | None = None) -> None:
    """Make `app.openapi()` include the hand-declared models (and the bearer scheme when the
    server wants an API key); `model_name` becomes the example of the OpenAI `model` fields."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=description, routes=app.routes)
        comps = schema.setdefault("components", {})
        schemas = comps.setdefault("schemas", {})
        _, defs = models_json_schema([(m, "validation") for m in _MODELS.values()], ref_template=_REF)
        for name, s in defs.get("$defs", {}).items():
            schemas.setdefault(name, s)
        if model_name:
            for s in schemas.values():
                model = s.get("properties", {}).get("model")
                if model is not None and model.get("type") == "string" and "model" in s.get("required", ()):
                    model["examples"] = [model_name]
        if bearer:
            comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in schema.get("paths", {}).items():
                if path == "/health":
                    continue
                for op in ops.values():
                    op["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
