"""The FastAPI application of `codeshell serve`: routes of every API family, CORS, API keys,
request metrics, health, and the web UI's static files.

`build_app(settings)` wires a `CompletionService` into the app; the model loads in a thread
at startup while `/health` answers `loading`. Cross-cutting concerns live in one pure ASGI
middleware (not Starlette's BaseHTTPMiddleware, which would buffer streams and hide client
disconnects). Errors are rendered in the shape of the API family of the path.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .compat import llamacpp, tgi
from .errors import ApiError, llamacpp_error, openai_error, tgi_error
from .metrics import CONTENT_TYPE_LATEST, Metrics
from . import schema
from .openai import router as openai_router
from .service import CompletionService, ServeSettings

log = logging.getLogger("codeshell.serve")
WEBUI = Path(__file__).parent / "webui"

ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/infill", "/completion", "/generate",
             "/generate_stream", "/tokenize", "/detokenize", "/health", "/metrics", "/", "/openapi.json", "/docs"}
_PUBLIC = ("/health",)  # never behind the API key
_STATIC = ("/", "/static/", "/favicon.ico")  # the web UI's files: public, they hold no data


def render_error(path: str, e: ApiError) -> JSONResponse:
    if path.startswith("/generate"):
        return tgi_error(e)
    if path in ("/infill", "/completion", "/tokenize", "/detokenize"):
        return llamacpp_error(e)
    return openai_error(e)


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "loading", "failed"]
    model: str
    error: str | None = None
    queue: int | None = None
    running: int | None = None
    max_model_len: int | None = None


class ServerMiddleware:
    """CORS (preflight for any path, headers on every response), API keys, request counts."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app = app
        self.keys = [k.encode() for k in settings.api_keys]
        self.origins = settings.cors_origins
        self.metrics = metrics

    def _cors(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        if "*" in self.origins:
            allow = "*"
        elif origin and origin in self.origins:
            allow = origin
        else:
            return []
        return [(b"access-control-allow-origin", allow.encode()),
                (b"access-control-allow-headers", b"content-type, authorization, accept"),
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-max-age", b"600")]

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        if not auth.lower().startswith(b"bearer "):
            return False
        given = auth[7:].strip()
        return any(hmac.compare_digest(given, k) for k in self.keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        headers = dict(scope["headers"])
        cors = self._cors(headers.get(b"origin", b"").decode("latin-1") or None)
        endpoint = path if path in ENDPOINTS else ("/static" if path.startswith("/static/") else "other")

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + cors
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        if method == "OPTIONS":  # CORS preflight: always fine, never needs a key
            await send_wrapped({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-length", b"0")]})
            return await send({"type": "http.response.body", "body": b""})
        public = path in _PUBLIC or (method == "GET" and (path == "/" or path.startswith("/static/")
                                                          or path == "/favicon.ico"))
        if self.keys and not public and not self._authorized(headers):
            e = ApiError(401, "a valid API key is needed: send `Authorization: Bearer KEY`",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            resp = render_error(path, e)
            return await resp(scope, receive, send_wrapped)
        return await self.app(scope, receive, send_wrapped)


def build_app(settings: ServeSettings, load_in_thread: bool = True) -> FastAPI:
    metrics = Metrics()
    service = CompletionService(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start(load_in_thread=load_in_thread)
        yield
        # uvicorn has stopped accepting and let in-flight requests run for the grace period.
        await service.shutdown()

    from .. import __version__
    # The schema and its browsable page, as vLLM's server has them (behind the API key when set).
    app = FastAPI(title="codeshell serve", version=__version__, lifespan=lifespan, docs_url="/docs",
                  redoc_url=None, openapi_url="/openapi.json")
    app.state.service = service
    app.state.settings = settings
    app.include_router(openai_router)
    app.include_router(llamacpp.router)
    app.include_router(tgi.router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return render_error(request.url.path, e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return render_error(request.url.path, ApiError(e.status_code, msg, code="not_found"
                                                       if e.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return render_error(request.url.path, ApiError(400, str(e.errors()[0].get("msg"))))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return render_error(request.url.path, ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health", tags=["server"], summary="Readiness (never needs a key)",
             responses={200: schema.json_response(Health, "the model is loaded"),
                        503: schema.json_response(Health, "loading, or the load failed (`error` says why)")})
    async def health():
        body = {"status": {"ready": "ok"}.get(service.state, service.state), "model": settings.model_name}
        if service.state == "failed":
            body["error"] = service.load_error
        if service.state == "ready":
            body.update(queue=service.aengine.num_waiting(), running=service.aengine.num_running(),
                        max_model_len=service.max_model_len)
        return JSONResponse(body, status_code=200 if service.state == "ready" else 503)

    @app.get("/metrics", tags=["server"], summary="Prometheus metrics",
             responses={200: {"description": "Prometheus text format",
                              "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", tags=["server"], summary="The web page (chat and FIM playground)",
             responses={200: {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}})
    async def index():
        return FileResponse(WEBUI / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=WEBUI), name="static")
    schema.install(app, bearer=bool(settings.api_keys), model_name=settings.model_name, description=(
        "One server for the CodeShell IDE plugins (llama.cpp's /infill, /completion, /tokenize, "
        "/detokenize; TGI's /generate, /generate_stream), OpenAI clients (/v1/...) and a web page. "
        "Errors come in each API family's own shape."))
    app.add_middleware(ServerMiddleware, settings=settings, metrics=metrics)
    return app
