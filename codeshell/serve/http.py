"""Request-body parsing and response framing shared by every API family.

`read_body` enforces the body limit, strict UTF-8 and JSON, and validates against a pydantic
model, turning every failure into an `ApiError` that names the field; `begin` is every body-taking
route's first three steps (the app's service, its body, readiness) in the one order all APIs answer
errors in. `sse` frames one
server-sent event; `until_disconnect` runs a non-streaming generation but aborts it when the
client goes away. Nothing here knows a particular API's field names.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from .errors import ApiError

if TYPE_CHECKING:
    from .service import CompletionService

M = TypeVar("M", bound=BaseModel)


async def read_raw(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str):
    # Python's json accepts NaN and Infinity; JSON does not, and they cannot be sent back either.
    raise ApiError(400, f"the request body is not valid JSON: {name} is not a JSON number")


async def read_json(request: Request, limit: int) -> Any:
    raw = await read_raw(request, limit)
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None


def validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or None
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of this API)"
        raise ApiError(400, f"{loc}: {msg}" if loc else msg, param=loc) from None


async def read_model(request: Request, model: type[M], limit: int) -> M:
    return validate(model, await read_json(request, limit))


def service(request: Request) -> CompletionService:
    """The app's one completion service: every API family is an adapter over it."""
    return request.app.state.service


async def begin(request: Request, model: type[M]) -> tuple[CompletionService, M]:
    """A body-taking route's start: the body within the server's limit and valid for `model` (413 / 400
    otherwise), then readiness (503 while loading), in that order for every API."""
    svc = service(request)
    body = await read_model(request, model, svc.settings.max_body_bytes)
    svc.ready()
    return svc, body


def sse(payload: Any, *, space: bool = True) -> bytes:
    """One SSE event, LF-framed. JSON is ASCII-escaped so that no network chunk can split a
    multi-byte character (the VS Code plugin decodes each chunk on its own)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=True)
    return (("data: " if space else "data:") + data + "\n\n").encode()


async def until_disconnect(request: Request, work: Awaitable):
    """Await `work`, cancelling it (which aborts its generation) if the client disconnects."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise ApiError(499, "the client closed the connection")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class EventStream(StreamingResponse):
    """A `text/event-stream` response that closes (and so aborts) its generations however the
    response ends, even when the body never started (the client left before the first byte)."""

    def __init__(self, body, generations=(), **kw):
        super().__init__(body, media_type="text/event-stream", **kw)
        self.generations = list(generations)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for g in self.generations:
                await g.aclose()
            await self.body_iterator.aclose()
