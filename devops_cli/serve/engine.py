"""The engines behind `serve`: token ids in, token ids out, one async stream per request.

- `BatchingEngine`: transformers' continuous batching (`model.init_continuous_batching()`), every
  request joins the running batch at its next step and leaves it when done; a client that goes away
  cancels its request (`cancel_request`) and frees its slot.
- `SerialEngine`: the chat decode loop (chat/decode.py), one request at a time in one thread; the
  fallback when continuous batching cannot serve the model, and the engine for requests that need a
  processor continuous batching lacks (repetition penalty).

`start_engine` checks the batching engine at start-up against the decode loop (greedy tokens of a
short prompt) and falls back with a warning when they differ or batching fails: a fast wrong answer
is worse than a slow right one.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field


@dataclass
class Job:
    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)


class SerialEngine:
    """The decode loop of `chat`, one request after another in one generation thread."""

    name = "serial (chat decode loop)"

    def __init__(self, model, why: str = ""):
        import concurrent.futures

        self.model = model
        self.why = why
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")

    async def stream(self, job: Job):
        import torch

        from devops_cli.chat.decode import stream

        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        settings = {"max_new_tokens": job.max_new_tokens, "do_sample": job.temperature > 0,
                    "temperature": job.temperature or 1.0, "top_p": job.top_p, "top_k": job.top_k,
                    "repetition_penalty": job.repetition_penalty}

        def work():
            try:
                if cancelled.is_set():
                    return
                if job.seed is not None:
                    torch.manual_seed(job.seed)
                with torch.inference_mode():
                    x = torch.tensor([job.ids], dtype=torch.int64, device=self.model.device)
                    stream(self.model, x, settings, job.stop_ids,
                           lambda t: loop.call_soon_threadsafe(out.put_nowait, t), cancelled.is_set)
            except BaseException as e:  # handed to the request
                loop.call_soon_threadsafe(out.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(out.put_nowait, None)

        self._pool.submit(work)
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, BaseException):
                    raise RuntimeError(f"generation failed: {type(item).__name__}: {item}")
                yield [item]
        finally:
            cancelled.set()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


class BatchingEngine:
    """transformers' continuous batching manager, sampling settings per request."""

    name = "continuous batching (transformers)"
    why = ""

    def __init__(self, model, stop_ids: list[int], max_concurrent: int, cache_tokens: int | None = None):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.model = model
        # the per-request processors exist only when the config has them at init: temperature != 1,
        # top_k and top_p < 1; greedy requests ask for top_k 1
        config = GenerationConfig(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=256,
                                  eos_token_id=list(stop_ids) or -1, pad_token_id=(stop_ids or [0])[0])
        self.manager = model.init_continuous_batching(
            generation_config=config,
            continuous_batching_config=ContinuousBatchingConfig(per_request_processors=True,
                                                                max_requests_per_batch=max_concurrent,
                                                                **cache_size(model, max_concurrent, cache_tokens)))
        self.manager.start()
        self._ids = itertools.count()
        self.vocab = int(model.config.get_text_config().vocab_size)

    async def stream(self, job: Job):
        out: asyncio.Queue = asyncio.Queue()
        rid = f"r{next(self._ids)}"
        self.manager.register_result_handler(rid, out.put_nowait)
        greedy = job.temperature <= 0  # and its top_k 0 keeps one token: 'off' is the whole vocabulary
        added = self.manager.add_request(
            job.ids, request_id=rid, max_new_tokens=job.max_new_tokens, streaming=True,
            eos_token_id=list(job.stop_ids) or [-1], temperature=1.0 if greedy else float(job.temperature),
            top_k=1 if greedy else (job.top_k or self.vocab), top_p=1.0 if greedy else float(job.top_p))
        if added is None:
            raise RuntimeError("the batching engine refused the request (it is stopping)")
        sent, finished = 0, False
        try:
            while not finished:
                result = await out.get()
                while not result.is_finished() and not result.error and not out.empty():
                    result = out.get_nowait()  # the reader fell behind: the newest result carries all tokens
                if result.error:
                    raise RuntimeError(f"generation failed: {result.error}")
                tokens = result.generated_tokens
                if len(tokens) > sent:
                    yield tokens[sent:]
                    sent = len(tokens)
                finished = result.is_finished()
        finally:
            if not finished:
                self.manager.cancel_request(rid)

    def close(self):
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=10)


PAGE = 256  # tokens per cache block (transformers' default page_size)
CPU_TOKENS_PER_REQUEST = 2048


def cache_size(model, max_concurrent: int, tokens: int | None) -> dict:
    """The paged KV cache's size. On a GPU transformers sizes it from free memory (as vLLM does); on
    CPU that rule takes 60-90% of the machine's free RAM (14 GB for the tiny model here), so there
    the cache holds `tokens` (default: max_concurrent x 2048) and batches stay at 1024 tokens (the
    attention masks grow with both)."""
    if tokens is None and model.device.type != "cpu":
        return {}
    if tokens is None:
        tokens = max_concurrent * CPU_TOKENS_PER_REQUEST
    out = {"num_blocks": max(1, -(-tokens // PAGE)), "page_size": PAGE}
    if model.device.type == "cpu":
        out["max_batch_tokens"] = 1024
    return out


async def self_check(engine, model, ids: list[int], steps: int = 8) -> str | None:
    """Greedy tokens of `ids` from the engine against the chat decode loop: None when identical."""
    import torch

    from devops_cli.chat.decode import stream

    ours: list[int] = []

    def plain():
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.int64, device=model.device)
            stream(model, x, {"max_new_tokens": steps, "do_sample": False}, [], ours.append, lambda: False)

    await asyncio.to_thread(plain)
    theirs: list[int] = []
    async for tokens in engine.stream(Job(ids, steps)):
        theirs += tokens
    return None if theirs == ours else f"greedy tokens {theirs} vs the decode loop's {ours}"


async def start_engine(kind: str, model, stop_ids: list[int], max_concurrent: int, check_ids: list[int],
                       cache_tokens: int | None = None):
    """The engine for `--engine hf`: continuous batching when it passes its check, else serial."""
    from devops_cli import guard
    from devops_cli.errors import first_line

    if kind == "serial":
        return SerialEngine(model)
    try:
        engine = BatchingEngine(model, stop_ids, max_concurrent, cache_tokens)
    except Exception as e:  # noqa: BLE001 - a model continuous batching cannot take
        why = f"it could not start: {type(e).__name__}: {first_line(e)}"
    else:
        try:
            why = await asyncio.wait_for(self_check(engine, model, check_ids), 600)
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {first_line(e)}"
        if why is None:
            return engine
        engine.close()
    return SerialEngine(model, guard.fallback("serve", "continuous batching", why, "the serial decode loop"))
