"""ChatSession: the conversation (system prompt, turns, generation settings), the window that decides
which turns the model still sees, and streaming generation. No terminal code here: the REPL
(repl.py) and the one-shot command (chat_cmd.py) are front ends over the same session.

Prompts follow Qwen v1's `model.chat`: the tokenizer's chat template renders the conversation, and
each message's content is encoded with special tokens split, so a literal `<|im_end|>` in a pasted
log stays text instead of ending the turn. When system + kept turns + the new message exceed the
window, the oldest turns leave the window (they stay in the transcript) and the caller is told.
"""

from __future__ import annotations

import array
import concurrent.futures
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, field

from devops_cli.chat.prompt import PromptEncoder, context_length, stop_ids, think_split
from devops_cli.chat.settings import SETTINGS, parse_setting
from devops_cli.chat.textstream import TextStream
from devops_cli.chat.thinking import is_thinking, opens_thinking, split
from devops_cli.errors import DevopsError, first_line
from devops_cli.options import check_seed

_FRAME = 0.02  # seconds between text updates while streaming


@dataclass
class Turn:
    user: str
    assistant: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    stopped: bool = False  # the user interrupted the reply
    steps: list = field(default_factory=list)  # tool use before the answer: assistant calls, tool results
    done: bool = True  # False while the model's calls wait for their results (chat --tools)


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    first_token_seconds: float | None
    dropped: int = 0  # turns that left the window for this reply
    stopped: bool = False
    reasoning: str | None = None  # a thinking model's think block (None: it did not think)
    answer: str | None = None  # the reply without its think block (None: all of `text`)
    calls: list | None = None  # the tool calls it makes, as OpenAI's tool_calls (chat --tools)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class _Tokens:
    """Token ids from the generation thread to the consumer; decoding happens off the generation
    thread so streaming costs the decode loop as little as possible.

    The first token is handed over synchronously: after queueing it the generation thread blocks
    until the consumer has taken it (`taken`). Otherwise the consumer, woken by the queue, would wait
    for the GIL while the generation thread runs the next step's Python code, up to the interpreter's
    switch interval (5 ms) late, which is a third of the tiny model's whole prefill."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.done = threading.Event()
        self.taken = threading.Event()

    def put(self, token_id: int):
        self.queue.put(token_id)
        if not self.taken.is_set():
            self.taken.wait(1.0)  # the consumer sets it on the first token (and on any exit)

    def end(self):
        self.queue.put(None)
        self.done.set()


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    model_name: str
    settings: dict
    system: str
    seed: int | None = None
    max_window: int | None = None  # prompt tokens the model may see; None = context - max_new_tokens
    adapter: str | None = None
    enable_thinking: bool | None = None  # thinking templates: /think, /no_think; None = the template's default
    tools: list | None = None  # OpenAI tools offered to the model (chat --tools)
    turns: list[Turn] = field(default_factory=list)
    first_in_window: int = 0  # turns before this index have left the window
    last_prompt: str = ""
    last_prompt_tokens: int = 0
    _executor: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        import torch

        if self.seed is None:
            self.seed = random.randrange(2**31)
        torch.manual_seed(self.seed)
        self.prompts = PromptEncoder(self.tokenizer, self.model_name)
        self.thinking = is_thinking(self.tokenizer)
        self.prompt_opens_thinking = False  # the last prompt ends inside an open think block
        self.stop_ids = stop_ids(self.model, self.tokenizer)
        self.context = context_length(self.model.config)
        if self.settings.get("max_new_tokens", 0) > self.context - 16:  # a generation_config asking for more
            self.settings["max_new_tokens"] = self.context - 16
        self.decoder = "own loop"  # or the plain path's record, once the loop failed its self-check
        self._stream = None
        self._check = self._start_self_check()

    # --- settings --------------------------------------------------------------------------------
    def window(self) -> int:
        if self.max_window:
            return self.max_window
        return max(self.context - self.settings["max_new_tokens"], self.context // 2)

    def set(self, name: str, text: str) -> str:
        """/set NAME VALUE; returns what changed, as a line for the user."""
        if name == "seed":
            import torch

            try:
                seed = int(text)
            except ValueError:
                raise DevopsError(f"seed must be an integer, got '{text}'") from None
            check_seed(seed, None)
            self.seed = seed
            torch.manual_seed(self.seed)
            return f"seed = {self.seed}"
        if name == "max_window":
            try:
                value = int(text)
            except ValueError:
                value = 0
            if value < 16:
                raise DevopsError(f"max_window must be an integer >= 16, got '{text}'")
            self.max_window = value
            return f"max_window = {value} tokens"
        value = self.check(name, parse_setting(name, text))
        self.settings[name] = value
        if name == "temperature":
            self.settings["do_sample"] = value > 0
            return f"temperature = {value} ({'sampling' if value > 0 else 'greedy'})"
        return f"{name} = {value}"

    def check(self, name: str, value):
        """The limits that depend on the model: new tokens must leave room for a prompt in its context."""
        if name == "max_new_tokens" and value > self.context - 16:
            raise DevopsError(f"max_new_tokens {value} does not fit this model's {self.context}-token context",
                              hint=f"use at most {self.context - 16}")
        return value

    def describe(self) -> dict:
        out = {**self.settings, "seed": self.seed, "max_window": self.window(), "decoder": self.decoder}
        if self.thinking:
            out["thinking"] = {None: "the template's default", True: "on", False: "off"}[self.enable_thinking]
        return out

    def think(self, on: bool) -> str:
        """/think, /no_think: a thinking template renders the next prompts with enable_thinking on/off."""
        if not self.thinking:
            raise DevopsError(f"the chat template of '{self.model_name}' has no thinking switch",
                              hint="/think and /no_think work with thinking models (Qwen3's template)")
        self.enable_thinking = on
        return f"thinking {'on' if on else 'off'} (from the next reply)"

    def template_kwargs(self) -> dict:
        return {"enable_thinking": self.enable_thinking} if self.thinking and self.enable_thinking is not None else {}

    # --- prompt ----------------------------------------------------------------------------------
    def messages(self, user: str | None, start: int | None = None) -> list[dict]:
        """The conversation the model sees: None for `user` continues the last turn (its tool results)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns[self.first_in_window if start is None else start:]:
            msgs += [{"role": "user", "content": turn.user}, *turn.steps]
            if turn.done:
                msgs.append({"role": "assistant", "content": turn.assistant})
        return msgs + ([{"role": "user", "content": user}] if user is not None else [])

    def encode(self, messages: list[dict]) -> tuple[str, list[int]]:
        return self.prompts.encode(messages, self.tools, **self.template_kwargs())

    def prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.encode(messages)[1])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)

    def prepare(self, user: str | None) -> tuple[str, list[int], int]:
        """Prompt for `user` after the kept turns; drops the oldest turns until it fits the window."""
        window = self.window()
        dropped, before = 0, self.first_in_window
        while True:
            text, ids = self.encode(self.messages(user))
            if len(ids) <= window or self.first_in_window >= len(self.turns) - (user is None):
                break
            self.first_in_window += 1
            dropped += 1
        if len(ids) > window:
            self.first_in_window = before
            raise DevopsError(f"this message needs {len(ids)} prompt tokens but the window is {window}",
                              hint="shorten it, or raise the window with /set max_window N (--max-window)")
        return text, ids, dropped

    # --- generation ------------------------------------------------------------------------------
    def send(self, user: str, on_text=None, on_drop=None) -> Reply:
        """Answer `user` after the kept history, calling on_text(delta, full_text) as text arrives and
        on_drop(turns, window) first when turns leave the window. Ctrl-C (KeyboardInterrupt) stops
        the reply; what was generated so far is kept."""
        start = time.perf_counter()
        if user is not None and self.pending():
            raise DevopsError(f"the model's call {self.pending()[0]['function']['name']} waits for its result",
                              hint="/result TEXT gives it one (what the command printed); /regen asks again")
        text, ids, dropped = self.prepare(user)
        self.prompt_opens_thinking = self.thinking and opens_thinking(text)
        if dropped and on_drop is not None:
            on_drop(dropped, self.window())
        reply = self._generate(ids, on_text, start)
        reply.dropped = dropped
        if self.thinking:
            reply.reasoning, reply.answer = split(reply.text, self.prompt_opens_thinking)
        self.last_prompt, self.last_prompt_tokens = text, len(ids)
        if user is None:  # the open turn goes on (its calls have their results)
            turn = self.turns[-1]
            turn.prompt_tokens, turn.completion_tokens = reply.prompt_tokens, turn.completion_tokens + reply.completion_tokens
            turn.seconds, turn.stopped = round(turn.seconds + reply.seconds, 3), reply.stopped
        else:
            turn = Turn(user, "", reply.prompt_tokens, reply.completion_tokens, round(reply.seconds, 3), reply.stopped)
            self.turns.append(turn)
        self._answered(turn, reply)
        if reply.text:  # tokenized now, while the user reads, instead of in the next turn's TTFT
            # (as the next prompt holds it: a thinking template drops the think block of earlier turns)
            self.remember(think_split({"role": "assistant", "content": reply.text})["content"] if self.thinking
                          else reply.text)
        return reply

    def _answered(self, turn: Turn, reply: Reply) -> None:
        """The reply ends the turn, or (tools) its calls open a step that waits for their results."""
        from devops_cli import tools as tool_rules

        if self.tools and reply.calls is None and not reply.stopped:
            content, found = tool_rules.parse(reply.text if reply.answer is None else reply.answer,
                                              tool_rules.names(self.tools))
            reply.calls = [tool_rules.openai_call(c) for c in found] or None
            if reply.calls:
                reply.answer = content
        if reply.calls:
            text = reply.answer if reply.answer is not None else reply.text
            turn.steps.append({"role": "assistant", "content": text or "", "tool_calls": reply.calls})
            turn.done = False
        else:
            turn.assistant, turn.done = reply.text, True

    def pending(self) -> list[dict]:
        """The calls of the open turn that have no result yet, in order."""
        if not self.turns or self.turns[-1].done:
            return []
        steps = self.turns[-1].steps
        calls = [c for m in steps if m["role"] == "assistant" for c in m["tool_calls"]]
        answered = {m["tool_call_id"] for m in steps if m["role"] == "tool"}
        return [c for c in calls if c["id"] not in answered]

    def result(self, call_id: str, text: str) -> None:
        """A tool call's result, as the user pasted it or an allowed command printed it."""
        self.turns[-1].steps.append({"role": "tool", "tool_call_id": call_id, "content": text})

    def resume(self, on_text=None, on_drop=None) -> Reply:
        """The model's next reply once every call of the open turn has its result."""
        if not self.turns or self.turns[-1].done or self.pending():
            raise DevopsError("no tool results to answer from yet", hint="/result TEXT gives a call its result")
        return self.send(None, on_text, on_drop)

    def remember(self, text: str) -> None:
        self.prompts.remember(text)

    def regen(self, on_text=None, on_drop=None) -> Reply:
        """Drop the last reply and answer its question again."""
        if not self.turns:
            raise DevopsError("nothing to regenerate yet")
        last = self.turns.pop()
        self.first_in_window = min(self.first_in_window, len(self.turns))
        try:
            return self.send(last.user, on_text, on_drop)
        except DevopsError:
            self.turns.append(last)
            raise

    def clear(self) -> None:
        self.turns.clear()
        self.first_in_window = 0

    def _generate(self, ids: list[int], on_text, start: float) -> Reply:
        import torch

        stream = self._decode_fn()
        stop = threading.Event()
        model = self.model
        # from a buffer: a tenth of torch.tensor(list)'s time (~0.1 ms for an 800-token prompt)
        input_ids = (torch.frombuffer(array.array("q", ids), dtype=torch.int64).view(1, -1) if ids else
                     torch.tensor([ids], dtype=torch.int64)).to(model.device)
        tokens = _Tokens()
        failure: list[BaseException] = []

        def work():
            try:
                with torch.inference_mode():
                    stream(model, input_ids, self.settings, self.stop_ids, tokens.put, stop.is_set)
            except BaseException as e:  # handed to the caller's thread
                failure.append(e)
            finally:
                tokens.end()

        future = self._worker().submit(work)
        out: list[int] = []
        shown = TextStream(self._decode)  # what the user has seen
        first = None
        stopped = False
        finished = False
        try:
            while not finished:
                try:
                    while True:
                        item = tokens.queue.get()
                        if item is None:
                            finished = True
                            break
                        if first is None:
                            first = time.perf_counter() - start
                            tokens.taken.set()  # the generation thread goes on
                        out.append(item)
                        if tokens.queue.empty():
                            break
                    if not stopped and on_text is not None:
                        delta = shown.add(out[len(shown.ids):])
                        if delta:
                            on_text(delta, shown.text)
                    if not finished:
                        tokens.done.wait(_FRAME)  # let tokens gather: at most ~50 updates a second
                except KeyboardInterrupt:
                    stopped = True
                    stop.set()
        finally:  # on any exit (an error in on_text, a closed pipe) stop the generation thread first
            tokens.taken.set()
            if not future.done():
                stop.set()
            while not future.done():
                try:
                    concurrent.futures.wait([future])
                except KeyboardInterrupt:
                    stopped = True
                    stop.set()
        seconds = time.perf_counter() - start
        if failure and not isinstance(failure[0], KeyboardInterrupt):
            e = failure[0]
            raise DevopsError(f"generation failed: {type(e).__name__}: {first_line(e)}")
        completion = [i for i in out if i not in self.stop_ids]
        text = self._decode(completion)
        if on_text is not None and text != shown.text and text.startswith(shown.text) and not stopped:
            on_text(text[len(shown.text):], text)  # what was held back: a trailing partial character
        if stopped and on_text is not None:
            text = shown.text  # the reply is what the user saw
        return Reply(text, len(ids), len(out), seconds, first, stopped=stopped)

    def _start_self_check(self):
        """decode.self_check on a short prompt of this session's own template, in the generation thread,
        while the user types; the first reply waits for it."""
        import torch

        from devops_cli.chat.decode import self_check

        ids = self.encode(self.messages("Hello"))[1]
        x = torch.tensor([ids], dtype=torch.int64, device=self.model.device)
        return self._worker().submit(self_check, self.model, x, dict(self.settings))

    def _decode_fn(self):
        """The loop that decodes: ours, or generate's when ours failed its self-check (warned once)."""
        from devops_cli import guard
        from devops_cli.chat.decode import stream, stream_generate

        if self._stream is None:
            why = self._check.result()
            if why is None:
                self._stream = stream
            else:
                self.decoder = guard.fallback("chat", "decode loop", why, "model.generate")
                self._stream = stream_generate
        return self._stream

    def _worker(self):
        """One generation thread for the whole session: a fresh thread per reply pays torch's per-thread
        set-up again (about 35 ms on the first forward of a 4x512 model on CPU)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")
        return self._executor

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- transcripts -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.model_name, "adapter": self.adapter, "seed": self.seed,
                "generation": dict(self.settings), "max_window": self.window(), "system": self.system,
                "turns": [asdict(t) for t in self.turns]}

    def restore(self, state: dict) -> None:
        """A transcript's turns and settings (transcript.load checked them), through the rules of /set."""
        settings = {name: self.check(name, parse_setting(name, str(value).lower() if isinstance(value, bool) else str(value)))
                    for name, value in (state.get("generation") or {}).items() if name in SETTINGS}  # fmt: skip
        turns = [Turn(**{k: v for k, v in t.items() if k in Turn.__dataclass_fields__}) for t in state["turns"]]
        self.turns, self.first_in_window = turns, 0
        self.system = state.get("system", self.system)
        self.settings.update(settings)
