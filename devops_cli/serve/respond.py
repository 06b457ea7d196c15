"""One admitted request through the engine to its client: the engine job (sampling resolved and held
to the engine's limits), text deltas cut at stop strings, the reply split into reasoning and content
(thinking.py) and the calls read out of it (tools.py, when the request has tools), and the response:
JSON, or SSE ending `data: [DONE]`. Every end is said to the client:
a stream the engine failed or the shutdown cut ends with an error event in OpenAI's streaming error
shape; a client that leaves cancels its generation, streamed or not."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

from starlette.responses import JSONResponse, Response, StreamingResponse

from devops_cli.chat.textstream import TextStream
from devops_cli.serve.api import error_body
from devops_cli.serve.engine import Cut, EngineError, Job
from devops_cli.serve.errors import ApiError

MIN_TEMPERATURE = 0.01  # vLLM's rule: 0 < t < 0.01 is raised to 0.01 (smaller overflows the softmax)


def make_job(loaded, body, ids: list[int], kind: str, max_tokens: int | None) -> Job:
    """The engine job of a request, or ApiError 400 when it cannot fit the context or the KV cache."""
    d = loaded.defaults
    sample = d.get("do_sample", False)
    temperature = body.temperature if body.temperature is not None else (d.get("temperature", 1.0) if sample else 0.0)
    if 0 < temperature < MIN_TEMPERATURE:
        temperature = MIN_TEMPERATURE
    top_k = body.top_k if body.top_k is not None else (d.get("top_k", 50) if sample else 0)
    top_p = body.top_p if body.top_p is not None else d.get("top_p", 1.0)
    job = Job(ids, 1, temperature=temperature, top_p=top_p, top_k=min(max(0, top_k), loaded.vocab),
              repetition_penalty=d.get("repetition_penalty", 1.0), seed=body.seed, stop_ids=loaded.stop_ids)
    param = "messages" if kind == "chat" else "prompt"
    window, where = loaded.context, "the model's context"
    cache = None if loaded.engine.seeded(job) else loaded.engine.capacity()
    if cache is not None and cache < window:
        window, where = cache, "what the KV cache holds for one request (--kv-cache-tokens)"
    if max_tokens is None:
        max_tokens = min(d.get("max_new_tokens", 512), window - len(ids))
    if max_tokens < 1 or len(ids) + max_tokens > window:
        raise ApiError(400, f"this request needs {len(ids)} prompt tokens + max_tokens {max(max_tokens, 1)}, more than "
                       f"{where}: {window} tokens; shorten the prompt or lower max_tokens", param=param,
                       code="context_length_exceeded")
    job.max_new_tokens = max_tokens
    return job


class Generation:
    """One request through the engine: text deltas as whole characters, stop strings, counts, metrics."""

    def __init__(self, server, job: Job, stops: list[str]):
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
        server.live.add(self.job)
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
            server.live.discard(self.job)
            (m.waiting if waiting else m.running).dec()
            m.prompt_tokens.inc(len(self.job.ids))
            m.completion_tokens.inc(len(self.tokens))


def failure(e: BaseException, generation: Generation) -> tuple[int, dict]:
    """The status and OpenAI error body of a generation that did not finish."""
    if isinstance(e, Cut):
        return 503, error_body(f"{e}; the answer was cut after {len(generation.tokens)} tokens — retry it",
                               "server_error", code="server_shutdown")
    if isinstance(e, EngineError):
        return 500, error_body(str(e), "server_error", code="engine_error")
    print(f"error: a request failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return 500, error_body(f"internal error: {type(e).__name__}: {e}", "server_error", code="internal_error")


class SlotStream(StreamingResponse):
    """A streamed response that frees its admission slot however it ends (sent, client gone, never started)."""

    def __init__(self, content, slot, **kw):
        super().__init__(content, **kw)
        self.slot = slot

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


def fingerprint(loaded, job: Job) -> str:
    """OpenAI's system_fingerprint: which path generated the reply (a seed holds on the serial one)."""
    from devops_cli import __version__

    serial = loaded.engine.name.startswith("serial") or loaded.engine.seeded(job)
    return f"fp_devops-model-{__version__}-{'serial' if serial else 'batched'}"


async def respond(server, request, body, job: Job, kind: str, slot, split):
    """The response to an admitted request; `split(text) -> (reasoning, content)` for chat replies."""
    generation = Generation(server, job, body.stops())
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    label = request.url.path
    meta = {"id": rid, "created": int(time.time()), "model": server.name,
            "system_fingerprint": fingerprint(server.loaded, job)}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return SlotStream(_sse(generation, meta, kind, usage, label, split), slot, media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return await _whole(server, request, generation, meta, kind, label, split)
    finally:
        slot.release()


async def _whole(server, request, generation: Generation, meta: dict, kind: str, label: str, split):
    async def collect():
        async for _ in generation.run():
            pass

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client left (or this task was cancelled): stop generating
            work.cancel()
    if not work.done() or work.cancelled():
        await asyncio.gather(work, return_exceptions=True)
        server.metrics.requests.labels(label, "499").inc()
        return Response(status_code=499)
    if (e := work.exception()) is not None:
        status, err = failure(e, generation)
        server.metrics.requests.labels(label, str(status)).inc()
        return JSONResponse(err, status_code=status)
    server.metrics.requests.labels(label, "200").inc()
    if kind == "chat":
        reasoning, content, calls = split(generation.text)
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else generation.finish,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": generation.text, "finish_reason": generation.finish, "logprobs": None}
        obj = "text_completion"
    return {**meta, "object": obj, "choices": [choice], "usage": generation.usage()}


async def _client_gone(request) -> None:
    """Returns when the client disconnects (the ASGI server's http.disconnect after the body)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _sse(generation: Generation, meta: dict, kind: str, usage: bool, label: str, split):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    deltas = split.stream() if kind == "chat" else None

    def chunk(delta: dict | str | None, finish=None) -> str:
        if kind == "chat":
            choice = {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        body = {**meta, "object": obj, "choices": [choice]}
        if usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    status = "200"
    try:
        if kind == "chat":
            yield chunk({"role": "assistant", "content": ""})
        async for text in generation.run():
            if deltas is None:
                yield chunk(text)
                continue
            for delta in deltas.add(text):
                yield chunk(delta)
        if deltas is not None:
            for delta in deltas.finish():
                yield chunk(delta)
        yield chunk(None, "tool_calls" if deltas is not None and deltas.count else generation.finish)
        if usage:
            yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': generation.usage()})}\n\n"
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"  # the client went away; the engine cancelled the request
        raise
    except Exception as e:  # noqa: BLE001 - the stream has begun: the error goes in it, then the end
        code, err = failure(e, generation)
        status = str(code)
        yield f"data: {json.dumps(err, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        generation.server.metrics.requests.labels(label, status).inc()


class ReplySplit:
    """A chat reply as (reasoning_content, content, tool_calls): split at the think block for thinking
    models (chat/thinking.py), whole as content otherwise; with tools, the content's calls read out by
    tools.CallStream (`opened`: the generation prompt already opened a call, tool_choice required or
    named; `parallel` false keeps the first call only). `stream()` gives the same split as deltas."""

    def __init__(self, thinking: bool, in_think: bool = False, tools: list[str] | None = None,
                 opened: str | None = None, parallel: bool = True):
        self.thinking, self.in_think = thinking, in_think
        self.tools, self.opened, self.parallel = tools, opened, parallel

    def __call__(self, text: str) -> tuple[str | None, str | None, list[dict]]:
        deltas = self.stream()
        parts = deltas.add(text) + deltas.finish()
        reasoning = "".join(d.get("reasoning_content", "") for d in parts)
        content = "".join(d.get("content", "") for d in parts)
        calls = [c for d in parts for c in d.get("tool_calls", []) if "id" in c]
        for d in parts:  # the arguments come in the delta after each call's first
            for c in d.get("tool_calls", []):
                if "id" not in c:
                    calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
        calls = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        return (reasoning if deltas.thought else None), (None if calls and not content else content), calls

    def stream(self) -> _Deltas:
        from devops_cli.chat.thinking import Splitter
        from devops_cli.tools import OPEN, CallStream

        calls = None
        if self.tools is not None:
            calls = CallStream(self.tools, first=self.opened is not None)
            if self.opened is not None:
                calls.add(self.opened[self.opened.index(OPEN) + len(OPEN):])
        return _Deltas(Splitter(self.in_think) if self.thinking else None, calls, self.parallel)


class _Deltas:
    """Text of a reply -> OpenAI chat deltas: {"reasoning_content"}, {"content"}, and for each call
    {"tool_calls": [{index, id, type, function: {name, arguments: ""}}]} then its arguments as OpenAI
    streams them ({"tool_calls": [{index, function: {arguments}}]})."""

    def __init__(self, splitter, calls, parallel: bool):
        self.splitter, self.calls, self.parallel = splitter, calls, parallel
        self.count = 0  # calls sent

    @property
    def thought(self) -> bool:
        return self.splitter is not None and self.splitter.thought

    def add(self, text: str) -> list[dict]:
        parts = [("content", text)] if self.splitter is None else self.splitter.add(text)
        return self._deltas(parts, False)

    def finish(self) -> list[dict]:
        return self._deltas([] if self.splitter is None else self.splitter.finish(), True)

    def _deltas(self, parts, end: bool) -> list[dict]:
        out = []
        for kind, text in parts:
            if kind == "reasoning":
                out.append({"reasoning_content": text})
            elif self.calls is None:
                out.append({"content": text})
            else:
                out += self._events(self.calls.add(text))
        if end and self.calls is not None:
            out += self._events(self.calls.finish())
        return out

    def _events(self, events) -> list[dict]:
        from devops_cli.tools import call_id

        out = []
        for kind, value in events:
            if kind == "content":
                out.append({"content": value})
            elif self.parallel or self.count == 0:
                i = self.count
                self.count += 1
                out.append({"tool_calls": [{"index": i, "id": call_id(), "type": "function",
                                            "function": {"name": value["name"], "arguments": ""}}]})
                out.append({"tool_calls": [{"index": i, "function": {"arguments": value["arguments"]}}]})
        return out
