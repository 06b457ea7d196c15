"""The FastAPI app of `serve`: OpenAI's /v1 routes over an engine (engine.py), /health, /metrics and
the chat page at /. The model loads after the socket is open: until it has, /health and /v1 answer
503; a model that fails to load stops the server (exit 2, one line). Every answer that is not a
success is OpenAI's error JSON, FastAPI's own 404/405 and unparseable bodies included. A request is
checked whole (api.py) and against the engine's limits before it is admitted; admission counts it in
the same step as the check, so --max-concurrent + --max-queue hold however requests arrive. Keys are
compared in constant time; bodies over the limit get 413; prompts are logged only when asked."""

from __future__ import annotations

import asyncio
import sys
import traceback
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from devops_cli.serve.api import ChatRequest, CompletionRequest, error_body, parse, validation_message
from devops_cli.serve.errors import ApiError
from devops_cli.serve.metrics import Metrics
from devops_cli.serve.middleware import BodyLimit, KeyCheck, route_label
from devops_cli.serve.respond import ReplySplit, make_job, respond


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
    vocab: int = 1 << 62
    thinking: bool = False  # the template writes think blocks: replies are split into reasoning and content


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
    drain_s: float = 8.0  # after SIGTERM, requests still generating are cut (with an error event) after this
    loaded: Loaded | None = None
    failed: str | None = None  # why the server stopped serving (the model did not load, the engine failed)
    exit_code: int = 0
    stopping: bool = False
    in_flight: int = 0
    live: set = field(default_factory=set)  # engine jobs generating now
    stop: object = None  # () -> None: ends the HTTP server (command.py sets it)
    metrics: Metrics = field(default_factory=Metrics)

    def admit(self) -> Slot:
        """A place for one more request, counted now (no await between the check and the count)."""
        if self.stopping:
            raise ApiError(503, "the server is shutting down; retry on another replica", "server_error",
                           code="server_shutdown")
        if self.in_flight >= self.max_concurrent + self.max_queue:
            raise ApiError(429, f"the server is busy: {self.in_flight} requests in flight (--max-concurrent "
                           f"{self.max_concurrent} + --max-queue {self.max_queue}); retry later", "rate_limit_error")
        self.in_flight += 1
        return Slot(self)

    def die(self, why: str, code: int) -> None:
        """Stop serving for good: /health fails at once, the process exits `code` with `why`."""
        if self.failed is None:
            self.failed, self.exit_code = why, code
        if self.stop is not None:
            self.stop()

    def begin_shutdown(self) -> None:
        """The HTTP server is draining: refuse new requests, cut those still generating after drain_s."""
        if not self.stopping:
            self.stopping = True
            asyncio.get_running_loop().call_later(self.drain_s, self._cut)

    def _cut(self) -> None:
        for job in list(self.live):
            job.abort("the server is shutting down")


class Slot:
    def __init__(self, server: Server):
        self.server, self.held = server, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.server.in_flight -= 1


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
    # plain ASGI middleware; the last added runs first: CORS answers preflights before the key check,
    # the key check before the body
    app.add_middleware(BodyLimit, limit=server.max_body, server=server)
    app.add_middleware(KeyCheck, server=server)
    if server.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=server.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def answer(request, status: int, body: dict, headers=None) -> JSONResponse:
        server.metrics.requests.labels(route_label(request.url.path), str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return answer(request, e.status, e.body)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        where = f"{request.method} {request.url.path}"
        if e.status_code == 404:
            message = f"Invalid URL ({where})"
        elif e.status_code == 405:
            message = f"Method Not Allowed ({where}): use {(e.headers or {}).get('Allow', 'another method')}"
        else:
            message = str(e.detail)
        return answer(request, e.status_code, error_body(message, code=None), e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return answer(request, 400, error_body(message, param=param))

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        print(f"error: {request.method} {request.url.path} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return answer(request, 500, error_body(f"internal error: {type(e).__name__}", "server_error",
                                               code="internal_error"))

    @app.get("/health")
    async def health():
        if server.stopping or server.failed:
            return JSONResponse({"status": "failed" if server.failed else "stopping", "error": server.failed},
                                status_code=503)
        if server.loaded is None:
            return JSONResponse({"status": "loading", "error": None}, status_code=503)
        engine = server.loaded.engine
        ok, state = engine.health()
        body = {"status": "ok" if ok else state, "model": server.name, "engine": engine.name,
                "restarts": getattr(engine, "restarts", 0)}
        return body if ok else JSONResponse(body, status_code=503)

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
    async def chat(request: Request):
        body = await _body(request, ChatRequest)
        loaded = _check(server, body.model)
        messages = []
        for m in body.messages:
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.role == "assistant" and m.reasoning_content:
                message["reasoning_content"] = m.reasoning_content
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump(exclude={"index"}) for c in m.tool_calls]
            messages.append(message)
        if messages[0]["role"] != "system" and loaded.system:
            messages.insert(0, {"role": "system", "content": loaded.system})
        kwargs = {k: v for k, v in (body.chat_template_kwargs.model_dump() if body.chat_template_kwargs else {}).items()
                  if v is not None}
        choice = body.choice()  # None: no tools in the prompt, no calls parsed (tool_choice none, or no tools)
        prompt, ids = await _encode(loaded, messages, kwargs, body.tools if choice else None)
        from devops_cli.chat.thinking import opens_thinking

        forced = None
        if choice not in (None, "auto"):  # required / a named function: the prompt opens the call (tools.opening)
            forced = forced_opening(loaded, prompt, None if choice == "required" else choice)
            ids = ids + await asyncio.to_thread(lambda: loaded.tokenizer(forced, add_special_tokens=False).input_ids)
        job = make_job(loaded, body, ids, "chat", body.max_completion_tokens or body.max_tokens)
        split = ReplySplit(loaded.thinking and forced is None, loaded.thinking and opens_thinking(prompt),
                           tools=[t["function"]["name"] for t in body.tools] if choice else None,
                           opened=forced, parallel=body.parallel_tool_calls is not False)
        return await _admitted(server, request, body, job, "chat", messages[-1]["content"], split)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request, CompletionRequest)
        loaded = _check(server, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        ids = (await asyncio.to_thread(loaded.tokenizer, prompts[0], add_special_tokens=False)).input_ids
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        job = make_job(loaded, body, ids, "text", body.max_tokens)
        return await _admitted(server, request, body, job, "text", prompts[0], None)

    return app


async def _body(request: Request, model):
    body, message, param = parse(model, await request.body())
    if body is None:
        raise ApiError(400, message, param=param)
    return body


def forced_opening(loaded: Loaded, prompt: str, name: str | None) -> str:
    """The text a forced tool call starts with after the generation prompt: the call's opening, after
    the empty think block a thinking template writes for an answer without reasoning."""
    from devops_cli.chat.thinking import CLOSE
    from devops_cli.tools import opening

    think = "<think>\n\n</think>\n\n" if loaded.thinking and not prompt.rstrip().endswith(CLOSE) else ""
    return think + opening(name)


async def _encode(loaded: Loaded, messages: list[dict], kwargs: dict, tools=None) -> tuple[str, list[int]]:
    from devops_cli.errors import DevopsError

    try:
        return await asyncio.to_thread(loaded.prompts.encode, messages, tools, **kwargs)
    except DevopsError as e:  # the model's own template refused these messages (e.g. Qwen3: no user message)
        raise ApiError(400, f"the chat template cannot render these messages: {e.message}", param="messages") from None


async def _admitted(server: Server, request: Request, body, job, kind: str, last: str, split):
    slot = server.admit()
    try:
        if server.log_prompts:
            print(f"prompt ({len(job.ids)} tokens): {last!r}", file=sys.stderr, flush=True)
        return await respond(server, request, body, job, kind, slot, split)
    except BaseException:
        slot.release()
        raise


async def _load(server: Server) -> None:
    try:
        server.loaded = await server.load()
    except Exception as e:  # noqa: BLE001 - the process ends with it in one line (command.py)
        from devops_cli.errors import first_line

        server.die(f"the model did not load: {first_line(e)}", 2)
        return
    engine = server.loaded.engine
    if hasattr(engine, "on_failed"):
        engine.on_failed = lambda why: server.die(why, 1)
        engine.on_restart = server.metrics.engine_restarts.inc


def _ready(server: Server) -> Loaded:
    if server.loaded is None:
        if server.failed:
            raise ApiError(503, f"the server is stopping: {server.failed}", "server_error")
        raise ApiError(503, "the model is still loading; retry when GET /health says ok", "server_error")
    if server.failed:
        raise ApiError(503, f"the server is stopping: {server.failed}", "server_error")
    return server.loaded


def _check(server: Server, model: str) -> Loaded:
    loaded = _ready(server)
    if model != server.name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{server.name}'",
                       param="model", code="model_not_found")
    return loaded
