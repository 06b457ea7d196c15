"""The reasoning of thinking models (Qwen3's hybrid template), split from the answer as vLLM's `qwen3`
reasoning parser does: text between `<think>` and `</think>` is reasoning, what follows is the
answer. Works on streamed text (tags split across deltas are held back until whole) and gives the
same split for a whole reply as for its deltas joined. Used by the chat REPL (reasoning shown dimmed)
and by serve (`reasoning_content` beside `content`)."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def is_thinking(tokenizer) -> bool:
    """The model's template writes think blocks and its tokenizer has the tags as tokens."""
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    return CLOSE in template and OPEN in vocab and CLOSE in vocab


def opens_thinking(prompt: str) -> bool:
    """The rendered prompt ends inside an open think block (templates that write `<think>` for the model)."""
    return prompt.rstrip().endswith(OPEN)


class Splitter:
    """Feed text as it comes (`add`), then `finish`; each returns [(kind, text)], kind 'reasoning' or
    'content'. Leading newlines of each part and the newlines before `</think>` are dropped."""

    def __init__(self, in_think: bool = False):
        self.state = "think" if in_think else "start"
        self.thought = in_think  # a think block was opened
        self.held = ""
        self.lead = True  # dropping the part's leading newlines

    def add(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self.held += text
        while self.held:
            if self.state == "start":  # is the reply a think block?
                body = self.held.lstrip()
                if body.startswith(OPEN):
                    self.held, self.state, self.lead, self.thought = body[len(OPEN):], "think", True, True
                    continue
                if OPEN.startswith(body):
                    break  # whitespace or a partial tag: wait
                self.state, self.lead = "content", False  # no think block: the reply as it came
                continue
            if self.state == "think":
                if self.lead:
                    self.held = self.held.lstrip("\n")
                    if not self.held:
                        break
                    self.lead = False
                end = self.held.find(CLOSE)
                if end >= 0:
                    self._emit(out, "reasoning", self.held[:end].rstrip("\n"))
                    self.held, self.state, self.lead = self.held[end + len(CLOSE):], "content", True
                    continue
                keep = _partial(self.held, CLOSE)
                text = self.held[: len(self.held) - keep]
                safe = text.rstrip("\n")  # newlines before a closing tag are dropped: wait and see
                self._emit(out, "reasoning", safe)
                self.held = self.held[len(safe):]
                break
            if self.lead:
                self.held = self.held.lstrip("\n")
                if not self.held:
                    break
                self.lead = False
            self._emit(out, "content", self.held)
            self.held = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        rest, self.held = self.held, ""
        if self.state == "start":
            self._emit(out, "content", rest)
        elif self.state == "think":
            self._emit(out, "reasoning", rest.rstrip("\n") if not self.lead else rest.strip("\n"))
        else:
            self._emit(out, "content", rest.lstrip("\n") if self.lead else rest)
        return out

    @staticmethod
    def _emit(out: list, kind: str, text: str) -> None:
        if text:
            out.append((kind, text))


def split(text: str, in_think: bool = False) -> tuple[str | None, str]:
    """(reasoning or None when the reply has no think block, content) of a whole reply."""
    s = Splitter(in_think)
    parts = s.add(text) + s.finish()
    reasoning = "".join(t for kind, t in parts if kind == "reasoning")
    content = "".join(t for kind, t in parts if kind == "content")
    return (reasoning if s.thought else None), content


def _partial(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (a tag cut between deltas)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
