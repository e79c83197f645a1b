"""HTTP-level errors of the server and how each API family renders them.

`ApiError` is raised anywhere below a route (bad input, busy, not ready); each API family
turns it into its own body: OpenAI's `{"error": {message, type, param, code}}`, TGI's
`{"error", "error_type"}`, llama.cpp's `{"error": {code, message, type}}`. Generation code
never builds HTTP responses itself.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "server_busy", 500: "internal_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "internal_error")


def busy(message: str = "the server is busy: too many requests are waiting; retry shortly",
         retry_after: int = 1) -> ApiError:
    return ApiError(503, message, code="server_busy", headers={"Retry-After": str(retry_after)})


def openai_error(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def tgi_error(e: ApiError) -> JSONResponse:
    # TGI answers bad input with 422 and error_type "validation".
    status = 422 if e.status in (400, 422) else e.status
    etype = "validation" if status == 422 else ("overloaded" if status == 503 else e.type)
    return JSONResponse({"error": e.message, "error_type": etype}, status_code=status, headers=e.headers)


def llamacpp_error(e: ApiError) -> JSONResponse:
    body = {"error": {"code": e.status, "message": e.message, "type": e.type}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)
