"""Errors that become HTTP responses, in OpenAI's shape: {"error": {message, type, param, code}};
and the handlers that give every failure of a route that shape."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
    500: "server_error", 503: "server_error", 504: "timeout_error",
}


class ServeError(Exception):
    """A request that ends with `status` and a message saying what is wrong (or what happened)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(errors) -> tuple[str, str | None]:
    """Pydantic's errors in one line: the first problem, and the parameter it is about."""
    error = errors[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if error["type"] == "missing":
        return f"{param} is required.", param
    if error["type"] == "extra_forbidden":
        return f"unknown parameter {param!r}.", param
    if error["type"] == "json_invalid":
        return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])}).", None
    got = repr(error.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return (f"{param}: {error['msg']}, got {got}." if param else f"{error['msg']}."), param


def add_error_handlers(app: FastAPI) -> None:
    """Every way a route can fail answers in OpenAI's shape, so that clients read one kind of error."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        message = messages.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect):  # mid-upload: nobody to answer
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):  # Starlette still logs the traceback
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return JSONResponse(error_body(400, message, param=param), status_code=400)
