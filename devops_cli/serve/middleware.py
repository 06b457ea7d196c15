"""The plain ASGI middleware of `serve` (Starlette's BaseHTTPMiddleware costs a task and a stream per
chunk): the API key check and the body size limit, each answering in OpenAI's error shape, and the
bounded route label every metric uses."""

from __future__ import annotations

import hmac
import json

from devops_cli.serve.api import error_body

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


def route_label(path: str) -> str:
    """The /metrics label of a path: one of ours, or 'other' (a scanner's random paths add no series)."""
    return path if path in ROUTES else "other"


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class KeyCheck:
    """With an API key set, /v1/ requests without 'Authorization: Bearer KEY' get 401 (compared in
    constant time)."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        key = self.server.api_key
        if scope["type"] == "http" and key is not None and scope["path"].startswith("/v1/"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, key.encode()):
                self.server.metrics.requests.labels(route_label(scope["path"]), "401").inc()
                return await send_json(send, 401, error_body(
                    "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                    code="invalid_api_key"))
        return await self.app(scope, receive, send)


class BodyLimit:
    """A request body over `limit` bytes gets 413 before the app reads it."""

    def __init__(self, app, limit: int, server):
        self.app, self.limit, self.server = app, limit, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, send)

    async def _refuse(self, scope, send):
        self.server.metrics.requests.labels(route_label(scope["path"]), "413").inc()
        await send_json(send, 413, error_body(f"request body over {self.limit} bytes", code="request_too_large"))


class _TooLarge(Exception):
    pass
