"""Aggregate throughput of `devops-model serve` (a real server process on 127.0.0.1, streaming chat
completions from a plain HTTP/SSE client, or the openai SDK with --client openai): the same requests
sent one at a time (the baseline), then by 1, 4 and 16
concurrent clients, in one run; then a load test of --clients x --per-client requests. Prints tokens/s,
the ratio against the baseline, p50/p95 time to first token, errors and incomplete replies.

    .venv/bin/python bench/serve.py [--model DIR] [--tokens 64] [--requests 32] [--clients 32 --per-client 4] [--client raw|openai]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TOPICS = ["a pod that keeps restarting", "a full disk on a node", "a failing CI pipeline", "DNS timeouts in a cluster",
          "a memory leak in a Java service", "TLS certificate expiry", "a stuck Terraform apply", "slow Postgres queries"]


async def one(client, name: str, i: int, tokens: int) -> dict:
    start = time.perf_counter()
    first, n, finish = None, 0, None
    body = {"model": name, "messages": [{"role": "user", "content": f"Request {i}: how do I debug {TOPICS[i % len(TOPICS)]}?"}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async for chunk in client(body):
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content") and first is None:
            first = time.perf_counter() - start
        if choices and choices[0].get("finish_reason"):
            finish = choices[0]["finish_reason"]
        if chunk.get("usage"):
            n = chunk["usage"]["completion_tokens"]
    return {"ttft": first if first is not None else time.perf_counter() - start, "tokens": n, "finish": finish,
            "complete": finish == "stop" or (finish == "length" and n == tokens)}


def openai_client(base: str):
    """The openai SDK's streaming chat, chunks as dicts."""
    import openai

    sdk = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)

    async def stream(body: dict):
        async for chunk in await sdk.chat.completions.create(**body):
            yield chunk.model_dump()

    return stream, sdk.close


def raw_client(base: str):
    """A plain HTTP/1.1 POST per request on its own connection, server-sent events parsed by hand, as
    vLLM's benchmark_serving does with aiohttp: the load generator shares the cores with the server,
    so it should cost as little as it can."""
    from urllib.parse import urlsplit

    url = urlsplit(base)
    path = url.path.rstrip("/") + "/chat/completions"

    async def stream(body: dict):
        data = json.dumps(body).encode()
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            status = (await reader.readline()).decode()
            if " 200 " not in status:
                raise RuntimeError(f"HTTP {status.strip()}: {(await reader.read()).decode()[:200]}")
            while (await reader.readline()) not in (b"\r\n", b""):
                pass  # headers
            pending = b""
            while True:  # chunked transfer encoding
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                pending += await reader.readexactly(size)
                await reader.readexactly(2)
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: ") and event != b"data: [DONE]":
                        yield json.loads(event[6:])
        finally:
            writer.close()

    async def close():
        pass

    return stream, close


async def run(base: str, name: str, concurrency: int, requests: list[int], tokens: int, client: str = "raw") -> dict:
    stream, close = (raw_client if client == "raw" else openai_client)(base)
    todo = list(requests)
    results, errors = [], []

    async def worker():
        while todo:
            i = todo.pop(0)
            try:
                results.append(await one(stream, name, i, tokens))
            except Exception as e:  # noqa: BLE001 - counted and shown
                errors.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await close()
    ttfts = sorted(r["ttft"] for r in results) or [0.0]
    return {"wall": wall, "tokens": sum(r["tokens"] for r in results), "errors": errors,
            "incomplete": sum(not r["complete"] for r in results), "n": len(results),
            "p50": statistics.median(ttfts), "p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: a fresh tiny model)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=32, help="requests per throughput case")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--per-client", type=int, default=4)
    p.add_argument("--engine", default="hf")
    p.add_argument("--client", choices=("raw", "openai"), default="raw",
                   help="raw: plain HTTP + SSE (light, the default); openai: the openai SDK (heavier on the cores it shares)")
    p.add_argument("--serve-arg", action="append", default=[], help="more serve flags, e.g. --serve-arg=--kv-cache-tokens=16384")
    a = p.parse_args()

    from kit import Served

    model = a.model
    if model is None:
        from devops_cli.tiny import build

        model = str(build(Path(tempfile.mkdtemp()) / "tiny"))
    with Served("--model", model, "--served-model-name", "bench", "--engine", a.engine,
                "--max-concurrent", str(max(16, a.clients)), "--max-queue", "256", *a.serve_arg) as server:
        requests = list(range(a.requests))
        asyncio.run(run(server.base, "bench", 4, requests[:8], a.tokens, a.client))  # warm-up, not counted
        rows = []
        base = asyncio.run(run(server.base, "bench", 1, requests, a.tokens, a.client))
        rows.append(("one at a time", base))
        for c in (1, 4, 16):
            rows.append((f"{c} concurrent", asyncio.run(run(server.base, "bench", c, requests, a.tokens, a.client))))
        load = asyncio.run(run(server.base, "bench", a.clients, list(range(a.clients * a.per_client)), a.tokens, a.client))
        rows.append((f"load {a.clients}x{a.per_client}", load))
        code = server.stop()
        engine = next((line for line in server.log().splitlines() if "engine:" in line), "?")
    print(f"serve bench: {model}, {a.tokens} tokens per reply, {a.requests} requests per case, {a.client} client; "
          f"{engine.strip()}")
    print(f"{'case':<16} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'x base':>7} "
          f"{'p50 TTFT':>9} {'p95 TTFT':>9} {'errors':>6} {'incomplete':>10}")
    base_rate = base["tokens"] / base["wall"]
    for label, r in rows:
        rate = r["tokens"] / r["wall"]
        print(f"{label:<16} {r['n']:>8} {r['tokens']:>7} {r['wall']:>7.2f} {rate:>8.1f} {rate / base_rate:>6.2f}x "
              f"{r['p50'] * 1000:>7.0f}ms {r['p95'] * 1000:>7.0f}ms {len(r['errors']):>6} {r['incomplete']:>10}")
    for label, r in rows:
        for e in r["errors"][:3]:
            print(f"  {label}: {e}")
    print(f"server exit code after SIGTERM: {code}")


if __name__ == "__main__":
    main()
