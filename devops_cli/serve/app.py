"""The FastAPI app of `serve`: OpenAI's /v1 routes over an engine (engine.py), /health, /metrics and
the chat page at /. The model loads after the socket is open: until it has, /health and /v1 answer
503. Keys are compared in constant time; bodies over the limit get 413; prompts are logged only when
asked."""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from devops_cli.chat.textstream import TextStream
from devops_cli.serve.api import ChatRequest, CompletionRequest, error_body, validation_message
from devops_cli.serve.engine import Job
from devops_cli.serve.metrics import Metrics


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    prompts: object  # chat.prompt.PromptEncoder
    stop_ids: list[int]
    context: int
    defaults: dict  # generation settings, as chat has them
    system: str
    engine: object


@dataclass
class Server:
    name: str  # the served model name
    load: object  # () -> Loaded, run in a thread once the socket is open
    api_key: str | None = None
    max_concurrent: int = 16
    max_queue: int = 64
    max_body: int = 4 << 20
    log_prompts: bool = False
    cors_origins: list[str] = field(default_factory=list)
    loaded: Loaded | None = None
    failed: str | None = None
    in_flight: int = 0
    metrics: Metrics = field(default_factory=Metrics)


def create_app(server: Server) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(_load(server))
        yield
        task.cancel()
        if server.loaded is not None:
            await asyncio.to_thread(server.loaded.engine.close)

    app = FastAPI(title="devops-model", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    # plain ASGI middleware (Starlette's BaseHTTPMiddleware costs a task and a stream per chunk); the
    # last added runs first: CORS answers preflights before the key check, the key check before the body
    app.add_middleware(BodyLimit, limit=server.max_body)
    app.add_middleware(KeyCheck, server=server)
    if server.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=server.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        server.metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        server.metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.get("/health")
    async def health():
        if server.loaded is None:
            return JSONResponse({"status": "failed" if server.failed else "loading", "error": server.failed},
                                status_code=503)
        return {"status": "ok", "model": server.name, "engine": server.loaded.engine.name}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("devops_cli").joinpath("assets/web/index.html").read_text("utf-8"))

    @app.get("/v1/models")
    async def models():
        loaded = _ready(server)
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0,
                                            "owned_by": "devops-model", "max_model_len": loaded.context}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        loaded = _check(server, body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if messages[0]["role"] != "system" and loaded.system:
            messages.insert(0, {"role": "system", "content": loaded.system})
        _, ids = await asyncio.to_thread(loaded.prompts.encode, messages)
        return await _respond(server, request, body, ids, "chat", messages[-1]["content"],
                              body.max_completion_tokens or body.max_tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        loaded = _check(server, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        ids = (await asyncio.to_thread(loaded.tokenizer, prompts[0], add_special_tokens=False)).input_ids
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        return await _respond(server, request, body, ids, "text", prompts[0], body.max_tokens)

    return app


async def _load(server: Server) -> None:
    try:
        server.loaded = await server.load()
    except Exception as e:  # noqa: BLE001 - said on /health and in the log, the server stays up to say it
        from devops_cli.errors import first_line

        server.failed = first_line(e)
        print(f"error: the model did not load: {server.failed}", file=sys.stderr, flush=True)


def _ready(server: Server) -> Loaded:
    if server.loaded is None:
        if server.failed:
            raise ApiError(503, f"the model failed to load: {server.failed}", "server_error")
        raise ApiError(503, "the model is still loading; retry when GET /health says ok", "server_error")
    return server.loaded


def _check(server: Server, model: str) -> Loaded:
    loaded = _ready(server)
    if model != server.name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{server.name}'",
                       param="model", code="model_not_found")
    return loaded


async def _respond(server: Server, request: Request, body, ids: list[int], kind: str, last: str, max_tokens):
    loaded = server.loaded
    d = loaded.defaults
    window = loaded.context
    max_new = max_tokens or min(d.get("max_new_tokens", 512), max(1, window - len(ids)))
    if len(ids) + max_new > window:
        raise ApiError(400, f"this request needs {len(ids)} prompt tokens + max_tokens {max_new}, more than the "
                       f"model's {window}-token context; shorten the prompt or lower max_tokens",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    if server.in_flight >= server.max_concurrent + server.max_queue:
        raise ApiError(429, f"the server is busy: {server.in_flight} requests in flight (--max-concurrent "
                       f"{server.max_concurrent} + --max-queue {server.max_queue}); retry later", "rate_limit_error")
    sample = d.get("do_sample", False)
    temperature = body.temperature if body.temperature is not None else (d.get("temperature", 1.0) if sample else 0.0)
    top_k = body.top_k if body.top_k is not None else (d.get("top_k", 50) if sample else 0)
    job = Job(ids, max_new, temperature=temperature, top_p=body.top_p or d.get("top_p", 1.0),
              top_k=max(0, top_k), repetition_penalty=d.get("repetition_penalty", 1.0), seed=body.seed,
              stop_ids=loaded.stop_ids)
    if server.log_prompts:
        print(f"prompt ({len(ids)} tokens): {last!r}", file=sys.stderr, flush=True)
    generation = _Generation(server, job, body.stops())
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    path = request.url.path
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_sse(generation, rid, server.name, kind, usage, path), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async for _ in generation.run():
        pass
    server.metrics.requests.labels(path, "200").inc()
    created = int(time.time())
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": generation.text},
                  "finish_reason": generation.finish, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": generation.text, "finish_reason": generation.finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": server.name, "choices": [choice],
            "usage": generation.usage()}


class _Generation:
    """One request through the engine: text deltas as whole characters, stop strings, counts, metrics."""

    def __init__(self, server: Server, job: Job, stops: list[str]):
        self.server, self.job, self.stops = server, job, stops
        self.tokens: list[int] = []
        self.text = ""
        self.finish = "length"

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.job.ids), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.job.ids) + len(self.tokens)}

    def _take(self, whole: str) -> str:
        """The text `whole` adds to what was sent, cut at the first stop string."""
        cut = min((i for i in (whole.find(s, max(0, len(self.text) - len(s))) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            whole, self.finish = whole[:cut], "stop"
        delta, self.text = whole[len(self.text):], whole
        return delta

    async def run(self):
        """Yields each new piece of text."""
        server, loaded = self.server, self.server.loaded
        m = server.metrics
        start = time.perf_counter()
        last = None
        stop_ids = set(self.job.stop_ids)
        server.in_flight += 1
        m.waiting.inc()
        waiting = True
        text = TextStream(lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True))
        try:
            async for new in loaded.engine.stream(self.job):
                now = time.perf_counter()
                if waiting:
                    m.waiting.dec()
                    m.running.inc()
                    waiting = False
                    m.ttft.observe(now - start)
                else:
                    m.per_token.observe((now - last) / len(new))
                last = now
                self.tokens += new
                if self.tokens[-1] in stop_ids:
                    self.finish = "stop"
                text.add([t for t in new if t not in stop_ids])
                if self.finish == "stop":
                    text.finish()
                if delta := self._take(text.text):
                    yield delta
                if self.finish == "stop":
                    break
            else:  # the engine stopped at max_tokens: the rest, a held-back partial character too
                text.finish()
                if delta := self._take(text.text):
                    yield delta
        finally:
            server.in_flight -= 1
            (m.waiting if waiting else m.running).dec()
            m.prompt_tokens.inc(len(self.job.ids))
            m.completion_tokens.inc(len(self.tokens))


async def _sse(generation: _Generation, rid: str, name: str, kind: str, usage: bool, path: str):
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: str | None, finish=None, role=False) -> str:
        if kind == "chat":
            d = {"role": "assistant", "content": delta or ""} if role else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        body = {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice]}
        if usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    status = "200"
    try:
        if kind == "chat":
            yield chunk(None, role=True)
        async for delta in generation.run():
            yield chunk(delta)
        yield chunk(None, generation.finish)
        if usage:
            body = {"id": rid, "object": obj, "created": created, "model": name, "choices": [],
                    "usage": generation.usage()}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"  # the client went away; the engine cancelled the request
        raise
    except Exception as e:  # noqa: BLE001 - the stream has begun: the error goes in it
        status = "500"
        yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
    finally:
        generation.server.metrics.requests.labels(path, status).inc()


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class KeyCheck:
    """ASGI middleware: with an API key set, /v1/ requests without 'Authorization: Bearer KEY' get 401
    (compared in constant time)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        key = self.server.api_key
        if scope["type"] == "http" and key is not None and scope["path"].startswith("/v1/"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, key.encode()):
                self.server.metrics.requests.labels(scope["path"], "401").inc()
                return await _send_json(send, 401, error_body(
                    "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                    code="invalid_api_key"))
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
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
            await self._refuse(send)

    async def _refuse(self, send):
        await _send_json(send, 413, error_body(f"request body over {self.limit} bytes", param=None,
                                               code="request_too_large"))


class _TooLarge(Exception):
    pass
