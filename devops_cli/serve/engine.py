"""The engines behind `serve`: token ids in, token ids out, one async stream per request.

- `BatchingEngine`: transformers' continuous batching (`model.init_continuous_batching()`), every
  request joins the running batch at its next step and leaves it when done; a client that goes away
  cancels its request (`cancel_request`) and frees its slot. An error inside the batch kills
  transformers' generation loop (and with it every request in the batch): the engine then fails those
  requests, starts a new manager, checks it (the start-up self-check again) and serves on; a restart
  that fails its check marks the engine failed (`on_failed`), and the server exits non-zero.
  A sampled request with a `seed` runs through the serial decode loop with its own generator (the
  batch samples every request from one generator, so a seed cannot hold there).
  Inside the batch, attention runs per sequence (attention.py) and top-k/top-p skip the vocabulary
  sorts (warpers.py), each checked against transformers' own path at run time.
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

CUT, DEAD = object(), object()  # queue items: the request was cut on purpose / its engine died


class EngineError(RuntimeError):
    """This request failed inside the engine; the engine itself serves on (or is being restarted)."""


class Cut(Exception):
    """The request was ended on purpose before it finished (the server is shutting down)."""


@dataclass(eq=False)  # hashed by identity: the server keeps the live ones in a set
class Job:
    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)
    cut: str | None = None  # why abort() ended it
    _wake: object = field(default=None, repr=False)  # the engine's queue for this request

    def abort(self, why: str) -> None:
        """End the request now; its stream raises Cut(why)."""
        if self.cut is None:
            self.cut = why
            if self._wake is not None:
                self._wake(CUT)


class SerialEngine:
    """The decode loop of `chat`, one request after another in one generation thread."""

    name = "serial (chat decode loop)"

    def __init__(self, model, why: str = ""):
        import concurrent.futures

        self.model = model
        self.why = why
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._live: set[threading.Event] = set()

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def capacity(self) -> int | None:
        return None  # the decode loop's cache grows with the request

    def seeded(self, job: Job) -> bool:
        return job.seed is not None and job.temperature > 0  # honoured here: each request has its generator

    async def stream(self, job: Job):
        import torch

        from devops_cli.chat.decode import stream

        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        job._wake = out.put_nowait
        cancelled = threading.Event()
        self._live.add(cancelled)
        settings = {"max_new_tokens": job.max_new_tokens, "do_sample": job.temperature > 0,
                    "temperature": job.temperature or 1.0, "top_p": job.top_p, "top_k": job.top_k,
                    "repetition_penalty": job.repetition_penalty}

        def work():
            try:
                if cancelled.is_set():
                    return
                generator = None
                if job.seed is not None and job.temperature > 0:
                    generator = torch.Generator(self.model.device).manual_seed(job.seed % 2**64)
                with torch.inference_mode():
                    x = torch.tensor([job.ids], dtype=torch.int64, device=self.model.device)
                    stream(self.model, x, settings, job.stop_ids,
                           lambda t: loop.call_soon_threadsafe(out.put_nowait, t), cancelled.is_set,
                           generator=generator)
            except BaseException as e:  # handed to the request
                loop.call_soon_threadsafe(out.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(out.put_nowait, None)

        if job.cut is not None:
            raise Cut(job.cut)
        self._pool.submit(work)
        try:
            while (item := await out.get()) is not None:
                if item is CUT:
                    raise Cut(job.cut)
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed: {type(item).__name__}: {item}")
                yield [item]
        finally:
            cancelled.set()
            self._live.discard(cancelled)

    def close(self):
        for cancelled in list(self._live):
            cancelled.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


class BatchingEngine:
    """transformers' continuous batching manager, sampling settings per request, restarted when its
    generation loop dies."""

    why = ""  # its name (the paths it runs) is set with each manager

    def __init__(self, model, stop_ids: list[int], max_concurrent: int, cache_tokens: int | None = None):
        self.model, self.stop_ids = model, list(stop_ids)
        self.max_concurrent, self.cache_tokens = max_concurrent, cache_tokens
        self.vocab = int(model.config.get_text_config().vocab_size)
        self.manager = self._new_manager()
        self._ids = itertools.count()
        self._live: dict[str, tuple[object, asyncio.Queue]] = {}  # request id -> (its manager, its queue)
        self.state, self.failure, self.restarts = "ok", None, 0
        self.check_ids: list[int] | None = None  # the prompt a restart checks itself on (start_engine sets it)
        self.on_failed = None  # (why) -> None, when a restart failed
        self.on_restart = None  # () -> None, for the metrics
        self.serial: SerialEngine | None = None  # seeded sampled requests
        self._recovery: asyncio.Task | None = None
        self._capacity: tuple[object, int | None] = (None, None)
        self._closing = False

    def _new_manager(self):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        from devops_cli.serve import attention, warpers

        # the per-request processors exist only when the config has them at init: temperature != 1,
        # top_k and top_p < 1; greedy requests ask for top_k 1
        config = GenerationConfig(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=256,
                                  eos_token_id=self.stop_ids or -1, pad_token_id=(self.stop_ids or [0])[0])
        manager = self.model.init_continuous_batching(
            generation_config=config,
            continuous_batching_config=ContinuousBatchingConfig(
                per_request_processors=True, max_requests_per_batch=self.max_concurrent,
                **cache_size(self.model, self.max_concurrent, self.cache_tokens)))
        self.name = (f"continuous batching (transformers; {attention.install(self.model)}; "
                     f"{warpers.install(manager, self.vocab, self.model.device)})")
        manager.start()
        return manager

    def health(self) -> tuple[bool, str]:
        """(serving, state): a generation loop found dead here starts its restart."""
        if self.state == "ok" and not self._closing and _dead(self.manager):
            self._fail_over(self.manager, "its generation loop is not running")
        if self.state == "failed":
            return False, f"failed: {self.failure}"
        return self.state == "ok", self.state

    def capacity(self) -> int | None:
        """The tokens (prompt + max_tokens) one request can hold in the paged KV cache."""
        manager = self.manager
        if self._capacity[0] is not manager:
            cache = getattr(getattr(manager, "batch_processor", None), "cache", None)
            if cache is None:
                return None
            self._capacity = (manager, int(cache.num_blocks) * int(manager.continuous_batching_config.page_size))
        return self._capacity[1]

    def seeded(self, job: Job) -> bool:
        return job.seed is not None and job.temperature > 0

    async def stream(self, job: Job):
        if self.seeded(job):
            self.serial = self.serial or SerialEngine(self.model)
            async for tokens in self.serial.stream(job):
                yield tokens
            return
        if self.state == "ok" and _dead(self.manager):
            self._fail_over(self.manager, "its generation loop is not running")
        if self._recovery is not None:
            await asyncio.shield(self._recovery)
        if self.state == "failed":
            raise EngineError(f"the batching engine has failed: {self.failure}")
        async for tokens in self._stream(job):
            yield tokens

    async def _stream(self, job: Job):
        manager = self.manager
        out: asyncio.Queue = asyncio.Queue()
        job._wake = out.put_nowait
        if job.cut is not None:
            raise Cut(job.cut)
        rid = f"r{next(self._ids)}"
        self._live[rid] = (manager, out)
        manager.register_result_handler(rid, out.put_nowait)
        greedy = job.temperature <= 0  # and its top_k 0 keeps one token: 'off' is the whole vocabulary
        added = manager.add_request(
            job.ids, request_id=rid, max_new_tokens=job.max_new_tokens, streaming=True,
            eos_token_id=list(job.stop_ids) or [-1], temperature=1.0 if greedy else float(job.temperature),
            top_k=1 if greedy else min(job.top_k or self.vocab, self.vocab), top_p=1.0 if greedy else float(job.top_p))
        sent, finished = 0, False
        try:
            if added is None:
                self._fail_over(manager, "it stopped accepting requests")
                raise EngineError("the batching engine was not accepting requests; it is being restarted — retry")
            while not finished:
                result = await out.get()
                while result is not CUT and result is not DEAD and not result.is_finished() and not result.error \
                        and not out.empty():
                    result = out.get_nowait()  # the reader fell behind: the newest result carries all tokens
                if result is CUT:
                    raise Cut(job.cut)
                if result is DEAD or (result.error and _dead(manager)):
                    why = "its generation loop stopped" if result is DEAD else result.error
                    self._fail_over(manager, why)
                    raise EngineError(f"the batching engine failed on a batch holding this request ({why}); it is "
                                      "being restarted — retry the request")
                if result.error:
                    raise EngineError(f"generation failed: {result.error}")
                tokens = result.generated_tokens
                if len(tokens) > sent:
                    yield tokens[sent:]
                    sent = len(tokens)
                finished = result.is_finished()
        finally:
            self._live.pop(rid, None)
            if not finished and manager.is_running():
                manager.cancel_request(rid)

    def _fail_over(self, manager, why: str) -> None:
        """The generation loop of `manager` died: fail its requests, restart (once per manager)."""
        if manager is not self.manager or self._recovery is not None or self._closing or self.state == "failed":
            return
        self.state = "restarting"
        for owner, out in list(self._live.values()):
            if owner is manager:
                out.put_nowait(DEAD)
        self._recovery = asyncio.get_running_loop().create_task(self._recover(manager, str(why)))

    async def _recover(self, old, why: str) -> None:
        from devops_cli.console import info, warn
        from devops_cli.errors import first_line

        warn(f"serve: the batching engine's generation loop stopped ({first_line(why)}); restarting it")
        problem = None
        try:
            self.manager = await asyncio.to_thread(self._replace, old)
            if self.check_ids:
                problem = await asyncio.wait_for(self_check(self, self.model, self.check_ids, stream=self._stream), 600)
        except Exception as e:  # noqa: BLE001 - the restart failed: said, and the server exits
            problem = f"{type(e).__name__}: {first_line(e)}"
        self._recovery = None
        if problem is None:
            self.state, self.restarts = "ok", self.restarts + 1
            if self.on_restart:
                self.on_restart()
            info(f"serve: the batching engine restarted and passed its self-check (restart {self.restarts})")
            return
        self.state, self.failure = "failed", f"it stopped ({first_line(why)}) and its restart failed: {problem}"
        if self.on_failed:
            self.on_failed(f"the batching engine {self.failure}")

    def _replace(self, old):
        try:
            old.stop(block=True, timeout=10)
        except Exception:  # noqa: BLE001,S110 - a dead loop's stop may raise; a new manager replaces it anyway
            pass
        return self._new_manager()

    def close(self):
        self._closing = True
        if self.serial is not None:
            self.serial.close()
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=10)


def _dead(manager) -> bool:
    """The manager's generation loop has stopped or is stopping (transformers requests a hard stop
    before it fails the batch's requests, so this holds when their errors arrive)."""
    status = getattr(manager, "background_thread_status", None)
    return not manager.is_running() or (status is not None and status.can_accept_new_requests() is not None)


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


async def self_check(engine, model, ids: list[int], steps: int = 8, stream=None) -> str | None:
    """Greedy tokens of `ids` from the engine against the chat decode loop: None when identical."""
    import torch

    from devops_cli.chat.decode import stream as decode

    ours: list[int] = []

    def plain():
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.int64, device=model.device)
            decode(model, x, {"max_new_tokens": steps, "do_sample": False}, [], ours.append, lambda: False)

    await asyncio.to_thread(plain)
    theirs: list[int] = []
    async for tokens in (stream or engine.stream)(Job(ids, steps)):
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
            engine.check_ids = check_ids
            return engine
        engine.close()
    return SerialEngine(model, guard.fallback("serve", "continuous batching", why, "the serial decode loop"))
