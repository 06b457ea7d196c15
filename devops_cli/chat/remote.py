"""`chat --url`: the chat session against any OpenAI-compatible server (devops-model serve, vLLM,
ollama's /v1) instead of local weights. The conversation, window, /commands and transcripts are
ChatSession's; the prompt is rendered and counted by the server, so token counts before a reply are
estimates (4 characters a token) and the counts after it are the server's own `usage`. No torch."""

from __future__ import annotations

import http.client
import json
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from devops_cli.chat.session import ChatSession, Reply
from devops_cli.errors import DevopsError

CHARS_PER_TOKEN = 4


def _request(url: str, key: str | None, body: dict | None = None, timeout: float = 30):
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    try:
        return urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", {}).get("message") or e.reason
        except (ValueError, AttributeError):
            message = e.reason
        hint = "pass the server's key: --api-key KEY (or DEVOPS_MODEL_API_KEY)" if e.code == 401 else None
        raise DevopsError(f"{url}: HTTP {e.code}: {message}", hint=hint) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DevopsError(f"cannot reach {url}: {reason}",
                          hint="check --url (e.g. http://127.0.0.1:8000/v1) and that the server is running") from None


def models(base: str, key: str | None, wait: float = 300) -> list[dict]:
    """The server's model list; a server still loading its model (503) is waited for."""
    deadline, told = time.monotonic() + wait, False
    while True:
        try:
            response = _request(base + "/models", key)
            break
        except DevopsError as e:
            if "HTTP 503" not in e.message or time.monotonic() > deadline:
                raise
            if not told:
                from devops_cli.console import info

                info(f"{base}: the server is loading its model; waiting")
                told = True
            time.sleep(1)
    with response as r:
        try:
            return json.loads(r.read()).get("data") or []
        except ValueError:
            raise DevopsError(f"{base}/models did not answer JSON: is --url the API's /v1 base?") from None


@dataclass
class RemoteSession(ChatSession):
    url: str = ""
    api_key: str | None = None

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        self.seed_given = self.seed is not None  # sent only then: a server may serve seeded requests apart
        if self.seed is None:
            self.seed = random.randrange(2**31)
        listed = models(self.url, self.api_key)
        names = [m.get("id") for m in listed]
        if not self.model_name:
            if not names:
                raise DevopsError(f"{self.url}/models lists no model", hint="pass --served-model-name NAME")
            self.model_name = names[0]
        entry = next((m for m in listed if m.get("id") == self.model_name), {})
        self.context = int(entry.get("max_model_len") or 32768)
        self.stop_ids = []
        self.decoder = f"remote ({self.url})"
        self.thinking = True  # the server says: a reply with reasoning_content, /think and /no_think sent on
        self.prompt_opens_thinking = False  # the reply is rebuilt as <think>reasoning</think>content
        self._messages: list[dict] = []

    def describe(self) -> dict:
        return {**super().describe(), "server": self.url}

    def set(self, name: str, text: str) -> str:
        if name != "seed":
            return super().set(name, text)
        try:
            self.seed = int(text)
        except ValueError:
            raise DevopsError(f"seed must be an integer, got '{text}'") from None
        self.seed_given = True
        return f"seed = {self.seed}"

    def encode(self, messages: list[dict]) -> tuple[str, list[int]]:
        self._messages = messages  # the last prompt prepare() settled on is the one sent
        text = "".join(f"<{m['role']}>\n{m['content'] or json.dumps(m.get('tool_calls'))}\n" for m in messages)
        return text, [0] * (len(text) // CHARS_PER_TOKEN + 4 * len(messages))

    def remember(self, text: str) -> None:
        pass  # the server tokenizes

    def count_tokens(self, text: str) -> int:
        return len(text) // CHARS_PER_TOKEN

    def _generate(self, ids: list[int], on_text, start: float) -> Reply:
        s = self.settings
        body = {"model": self.model_name, "messages": self._messages, "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": s["max_new_tokens"]}
        if self.seed_given:
            body["seed"] = self.seed
        if self.tools:
            body["tools"] = self.tools
        if self.enable_thinking is not None:  # vLLM's and devops-model serve's switch
            body["chat_template_kwargs"] = {"enable_thinking": self.enable_thinking}
        if "temperature" in s:
            body["temperature"] = s["temperature"] if s.get("do_sample", True) else 0.0
        if "top_p" in s:
            body["top_p"] = s["top_p"]
        text, first, usage, stopped, done, thinking = "", None, {}, False, False, False
        calls: list[dict] = []  # tool calls rebuilt from their deltas (OpenAI's streaming form)
        response = _request(self.url + "/chat/completions", self.api_key, body, timeout=600)
        try:
            for raw in response:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise DevopsError(f"{self.url}: the server sent a line that is not JSON: {data[:80]!r}") from None
                if chunk.get("error"):
                    raise DevopsError(f"{self.url}: the answer failed after {len(text)} characters: "
                                      f"{chunk['error'].get('message')}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    delta, piece = choice.get("delta") or {}, ""
                    for d in delta.get("tool_calls") or []:
                        if d.get("index", len(calls)) >= len(calls):
                            calls.append({"id": d.get("id") or "", "type": "function",
                                          "function": {"name": "", "arguments": ""}})
                        fn = calls[d.get("index", len(calls) - 1)]["function"]
                        fn["name"] += (d.get("function") or {}).get("name") or ""
                        fn["arguments"] += (d.get("function") or {}).get("arguments") or ""
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if reasoning:  # rebuilt as the model wrote it: the session splits it as a local reply
                        piece, thinking = piece + ("" if thinking else "<think>\n") + reasoning, True
                    if delta.get("content"):
                        piece += ("\n</think>\n\n" if thinking else "") + delta["content"]
                        thinking = False
                    if piece:
                        if first is None:
                            first = time.perf_counter() - start
                        text += piece
                        if on_text is not None:
                            on_text(piece, text)
        except KeyboardInterrupt:
            stopped = True  # closing the stream cancels the request on the server
        except (OSError, http.client.HTTPException) as e:  # the connection broke (the server died)
            raise DevopsError(f"{self.url}: the connection broke after {len(text)} characters of the answer "
                              f"({type(e).__name__}); the answer is incomplete", hint="check the server") from None
        finally:
            response.close()
        if not done and not stopped:
            raise DevopsError(f"{self.url}: the server ended the answer after {len(text)} characters without "
                              "finishing it (no [DONE]); the answer is incomplete", hint="check the server")
        return Reply(text, usage.get("prompt_tokens", len(ids)), usage.get("completion_tokens", 0),
                     time.perf_counter() - start, first, stopped=stopped, calls=calls or None)
