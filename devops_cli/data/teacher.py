"""The one client for a teacher LLM: any OpenAI-compatible /v1/chat/completions endpoint (devops-model
serve, vLLM, ollama's /v1, a hosted API), through the `openai` SDK.

- Bounded concurrency (`concurrency` requests in flight) keeps a batching server's batch full.
- Retries with exponential backoff and jitter on 429, 5xx, timeouts and dropped connections (the SDK's
  own retries are off, so they are counted here); a 4xx other than 408/409/429 is the caller's mistake
  and stops the run with one line (401: the key; 404: the model or URL).
- A cache, one JSON line per finished request keyed by the request itself (model, messages, sampling),
  appended and flushed as each reply arrives: a crash, kill -9 or Ctrl-C loses no finished reply, and a
  rerun never repeats one. A torn last line (killed mid-write) is ignored.
- Every request is bounded in time (`timeout` per attempt), so a hanging server costs at most
  timeout × attempts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from devops_cli.errors import DevopsError, first_line

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
NOT_ASKED = "not asked (--max-requests)"


@dataclass
class Stats:
    requests: int = 0  # sent over the network (each attempt)
    cached: int = 0  # answered from the cache
    retries: int = 0
    failed: int = 0  # gave up after the last attempt
    tokens_in: int = 0
    tokens_out: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # why attempts failed, counted


@dataclass
class Reply:
    text: str | None  # None: no reply after every attempt (counted in Stats.failed)
    cached: bool = False
    error: str = ""


def request_key(model: str, messages: list[dict], params: dict) -> str:
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Cache:
    """Finished replies, one JSON line each ({"key", "text", "usage"}), appended as they arrive."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill mid-write: that request runs again
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, text: str, usage: dict) -> None:
        entry = {"key": key, "text": text, "usage": usage}
        self.entries[key] = entry
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class Teacher:
    def __init__(self, url: str, model: str | None, api_key: str | None, cache: Cache, concurrency: int = 8,
                 timeout: float = 120.0, attempts: int = 4, backoff: float = 1.0, params: dict | None = None,
                 max_requests: int | None = None):
        from openai import AsyncOpenAI

        self.url, self.model, self.cache = url.rstrip("/"), model, cache
        self.params = {"temperature": 0.3, "max_tokens": 1024, **(params or {})}
        self.attempts, self.backoff, self.timeout = attempts, backoff, timeout
        self.client = AsyncOpenAI(base_url=self.url, api_key=api_key or "none", max_retries=0, timeout=timeout)
        self.limit = asyncio.Semaphore(concurrency)
        self.max_requests = max_requests  # requests sent over the network; cached replies are free
        self.stats = Stats()

    async def resolve_model(self) -> str:
        """--teacher-model, or the server's only (first) model from /v1/models."""
        if self.model:
            return self.model
        try:
            models = [m.id async for m in self.client.models.list()]
        except Exception as e:  # noqa: BLE001 (any failure here is the URL's: one line)
            raise DevopsError(f"cannot list the teacher's models at {self.url}/models: {_why(e)}", "--teacher-url",
                              "check the URL (it ends in /v1) and the key, or pass --teacher-model") from None
        if not models:
            raise DevopsError(f"the teacher at {self.url} serves no model", "--teacher-model", "name one")
        self.model = models[0]
        return self.model

    async def ask(self, messages: list[dict]) -> Reply:
        key = request_key(self.model, messages, self.params)
        if (hit := self.cache.get(key)) is not None:
            self.stats.cached += 1
            return Reply(hit["text"], cached=True)
        async with self.limit:
            if self.max_requests is not None and self.stats.requests >= self.max_requests:
                return Reply(None, error=NOT_ASKED)
            return await self._ask(key, messages)

    async def _ask(self, key: str, messages: list[dict]) -> Reply:
        from openai import APIConnectionError, APIStatusError, APITimeoutError

        why = ""
        for attempt in range(self.attempts):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            self.stats.requests += 1
            try:
                r = await self.client.chat.completions.create(model=self.model, messages=messages, **self.params)
            except APIStatusError as e:
                why = f"HTTP {e.status_code}"
                if e.status_code not in RETRY_STATUS:
                    hint = ("check --api-key" if e.status_code in (401, 403) else
                            "check --teacher-model and --teacher-url" if e.status_code == 404 else
                            "the teacher refused the request")
                    raise DevopsError(f"the teacher at {self.url} answered {why}: {_why(e)}", "--teacher-url",
                                      hint) from None
            except (APITimeoutError, APIConnectionError) as e:
                why = "timeout" if isinstance(e, APITimeoutError) else "connection failed"
            except Exception as e:  # noqa: BLE001 (a reply that is not OpenAI's JSON, e.g. an HTML error page)
                why = f"bad reply ({type(e).__name__})"
            else:
                choice = r.choices[0] if r.choices else None
                text = choice.message.content if choice is not None and choice.message is not None else None
                usage = {"in": getattr(r.usage, "prompt_tokens", 0) or 0, "out": getattr(r.usage, "completion_tokens", 0) or 0}
                self.stats.tokens_in += usage["in"]
                self.stats.tokens_out += usage["out"]
                if text is None:
                    why = "empty reply"
                else:
                    self.cache.put(key, text, usage)
                    return Reply(text)
            self.stats.errors[why] = self.stats.errors.get(why, 0) + 1
        self.stats.failed += 1
        return Reply(None, error=why)

    async def close(self) -> None:
        await self.client.close()


def _why(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return first_line(str(msg))[:200]
    return first_line(e)[:200]


def parse_json(text: str):
    """The JSON object in a reply: the whole text, or a ```json fence, or the outermost {...}. None if
    there is none (the caller counts it as a structured-output failure)."""
    if text is None:
        return None
    candidates = [text.strip()]
    if "```" in text:
        candidates += [part.removeprefix("json").strip() for part in text.split("```")[1::2]]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start:end + 1])
    for c in candidates:
        try:
            value = json.loads(c)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None
