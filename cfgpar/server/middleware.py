"""Guard: the API key, the body-size limit and the per-request metrics, around every route."""

from __future__ import annotations

import hmac
import time

from fastapi.responses import JSONResponse

from cfgpar.server.errors import ServeError
from cfgpar.server.metrics import Metrics

PUBLIC_PATHS = frozenset({"/", "/health"})
"""Answered without the API key: the health probe, and the page (static; it asks for the key)."""


class Guard:
    """API key, body-size limit and per-request metrics around the whole app.

    Plain ASGI rather than BaseHTTPMiddleware: it must pass `receive` through untouched in
    spirit, because the handlers wait on it to learn that a client disconnected."""

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics: Metrics, routes: list):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics
        # (path regex, template): a metric's endpoint is the route's template, e.g. /v1/videos/{video_id},
        # so that every video id does not make a series of its own.
        self.routes = [(route.path_regex, route.path) for route in routes if hasattr(route, "path_regex")]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_recording(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await JSONResponse(refusal.body(), status_code=refusal.status, headers=refusal.headers)(
                    scope, receive, send_recording)
                return
            await self.app(scope, self._limited(receive), send_recording)
        finally:
            endpoint = next((path for regex, path in self.routes if regex.match(scope["path"])), "other")
            self.metrics.observe_request(endpoint, scope["method"], status, time.perf_counter() - start)

    def _refusal(self, scope) -> ServeError | None:
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in PUBLIC_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return ServeError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return _too_large(self.max_body)
        return None

    def _limited(self, receive):
        """`receive` that fails the request with 413 once the body passes the limit (chunked bodies
        have no Content-Length to check up front)."""
        total = 0

        async def receive_limited():
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_body:
                    raise _too_large(self.max_body)
            return message

        return receive_limited


def _too_large(limit: int) -> ServeError:
    return ServeError(413, f"the request body is over this server's limit of {limit / 2**20:g} MiB.")
