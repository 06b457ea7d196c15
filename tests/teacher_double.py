"""A scripted stand-in for an external teacher LLM (a third party's model, not the thing under test): a
real HTTP server on 127.0.0.1 speaking OpenAI's /v1/models and /v1/chat/completions, whose replies are
computed from the prompt — questions made from the chunk's sentences, answers copied from the sentence
that holds the question's terms — so `data qa` / `data exam` can be tested end to end on a real socket.

Modes for hostile tests: "good", "invalid_json", "html", "401", "hang", "flaky" (every other request
429), "ungrounded" (answers about something else). Every request is recorded (`seen`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = re.compile(r"<<<\n(.*?)\n>>>", re.S)
QUESTION = re.compile(r"(?:Question|问题)：?:?\s*(.+?)\n", re.S)


def sentences(text: str) -> list[str]:
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    parts = re.split(r"(?<=[.!?。！？])\s+|\n\s*\n", text)
    return [p.strip().replace("\n", " ") for p in parts if len(p.split()) >= 5 or len(p.strip()) >= 20]


def reply_for(prompt: str, mode: str) -> str:
    chunk = (CHUNK.search(prompt) or [None, ""])[1]
    found = sentences(chunk) or [chunk.strip()[:200] or "nothing"]
    if mode == "invalid_json":
        return "Sure! Here are questions: 1. what? 2. why?"
    if '"questions"' in prompt:
        n = int(m.group(1)) if (m := re.search(r"(?:Write|写出) (\d+)", prompt)) else 3
        return json.dumps({"questions": [f"What does the documentation say about: {s[:120]}?" for s in found[:n]]})
    if '"distractors"' in prompt:
        n = int(m.group(1)) if (m := re.search(r"(?:write|编写) (\d+)", prompt)) else 1
        items = []
        for s in found[:n]:
            words = s.split()
            items.append({"question": f"Which statement matches the documentation about {' '.join(words[:6])}?",
                          "answer": s[:160], "distractors": [f"{s[:100]} (never, on version {i})" for i in (1, 2, 3)],
                          "explanation": f"The text says: {s[:120]}"})
        return json.dumps({"items": items})
    q = (QUESTION.search(prompt) or [None, ""])[1]
    if mode == "ungrounded":
        return json.dumps({"answer": "Reboot the mainframe and call the vendor's hotline in Zurich."})
    best = max(found, key=lambda s: len(set(s.lower().split()) & set(q.lower().split())))
    return "```json\n" + json.dumps({"answer": best}) + "\n```"


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that hung up mid-request (the command stops at a 401, or its own timeout) is no error of
        the double's; anything else is printed as usual."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class TeacherDouble:
    def __init__(self, mode: str = "good", delay: float = 0.0, model: str = "teacher-7b"):
        self.mode, self.delay, self.model = mode, delay, model
        self.seen: list[dict] = []  # {"model", "messages", "temperature", "max_tokens"} per chat request
        self.answered = 0
        self._lock = threading.Lock()
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json"):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (its own bound, or it stopped): nothing to tell it

            def do_GET(self):
                if double.mode == "401":
                    return self._send(401, b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}')
                self._send(200, json.dumps({"object": "list", "data": [{"id": double.model, "object": "model"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with double._lock:
                    double.seen.append({k: body.get(k) for k in ("model", "messages", "temperature", "max_tokens")})
                    n = len(double.seen)
                if double.mode == "401":
                    return self._send(401, b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}')
                if double.mode == "hang":
                    time.sleep(3600)
                if double.mode == "html":
                    return self._send(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
                if double.mode == "flaky" and n % 2:
                    return self._send(429, b'{"error": {"message": "slow down", "type": "rate_limit"}}')
                if double.delay:
                    time.sleep(double.delay)
                text = reply_for(body["messages"][-1]["content"], double.mode)
                out = {"id": f"c{n}", "object": "chat.completion", "created": 0, "model": double.model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": len(body["messages"][-1]["content"]) // 4, "completion_tokens": len(text) // 4,
                                 "total_tokens": 0}}
                self._send(200, json.dumps(out).encode())
                with double._lock:
                    double.answered += 1

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def keys(self) -> list[str]:
        """The teacher cache's key of every request seen (data/teacher.py request_key)."""
        from devops_cli.data.teacher import request_key

        return [request_key(s["model"], s["messages"], {"temperature": s["temperature"], "max_tokens": s["max_tokens"]})
                for s in self.seen]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def digest(messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
