"""Showing a reply while it streams.

On a terminal: Markdown with highlighted code blocks (rich). Finished blocks (up to a blank line
outside a code fence) are printed once and stay; only the block being written lives in a rich Live
region, so long replies never repaint the whole screen. Without a terminal: the plain text, as it
arrives, flushed — pipes and files get exactly the reply.

A thinking model's reasoning (its `<think>` block, chat/thinking.py) is shown dimmed above the
answer on a terminal; pipes and files get the answer only.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.text import Text

_FENCES = ("```", "~~~")


def split_blocks(text: str) -> int:
    """Index up to which `text` consists of finished Markdown blocks (ends after a blank line that is
    not inside a code fence)."""
    in_fence = False
    safe = 0
    pos = 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        if not line.endswith("\n"):
            break  # the line is still being written
        stripped = line.strip()
        if stripped.startswith(_FENCES):
            in_fence = not in_fence
            if not in_fence:
                safe = pos  # a closed code block is finished
        elif not stripped and not in_fence:
            safe = pos
    return safe


class _Pending:
    """The block being written, rendered only when Live refreshes (not on every token) and cropped
    to its last lines when it is taller than the screen (Live cannot redraw what scrolled away)."""

    def __init__(self, console: Console):
        self.text = ""
        self.dim = False  # reasoning: plain dimmed text, not Markdown
        self.console = console

    def __rich_console__(self, console, options):
        text = self.text.strip("\n")
        if not text:
            return
        width = max(options.max_width, 20)
        room = max(self.console.height - 4, 4)
        if self.dim:
            renderable = Text(text[-room * width:], style="dim")
        elif len(text) > room * width * 2:  # very long: the tail as plain text is all that can show
            renderable = Text(text[-room * width:], style="dim")
        else:
            renderable = Markdown(text)
        lines = console.render_lines(renderable, options.update(height=None), pad=False)
        for line in lines[-room:]:
            yield from line
            yield Segment.line()


class ReplyView:
    """Context manager for one reply: `view.update(delta, full_text)` as text arrives. `thinking`: the
    text may open with a think block; `in_think()`, asked at the first text: the prompt opened it."""

    def __init__(self, console: Console, markdown: bool | None = None, out=None, thinking: bool = False,
                 in_think=lambda: False):
        self.console = console
        self.markdown = console.is_terminal if markdown is None else markdown
        self.out = out or sys.stdout
        self.done = 0  # characters of the answer already printed for good
        self.full = ""  # the answer so far
        self.reasoning = ""
        self.thinking, self.in_think = thinking, in_think
        self.splitter = None
        self._thought_shown = False
        self.live: Live | None = None
        self.pending = _Pending(console)

    def __enter__(self) -> ReplyView:
        if self.markdown:
            self.live = Live(self.pending, console=self.console, refresh_per_second=8, transient=True,
                             vertical_overflow="visible")
            self.live.start()
        return self

    def update(self, delta: str, full: str) -> None:
        if not self.thinking:
            return self._answer(delta)
        if self.splitter is None:
            from devops_cli.chat.thinking import Splitter

            self.splitter = Splitter(self.in_think())
        for kind, text in self.splitter.add(delta):
            (self._think if kind == "reasoning" else self._answer)(text)

    def _think(self, text: str) -> None:
        self.reasoning += text
        if self.markdown:
            self.pending.text, self.pending.dim = self.reasoning, True

    def _thought(self) -> None:
        """The reasoning is over: printed for good, dimmed, above the answer."""
        if self.reasoning and not self._thought_shown and self.markdown:
            self.pending.text, self.pending.dim = "", False
            self.live.console.print(Text(self.reasoning.strip("\n"), style="dim"))
            self.live.console.print()
        self._thought_shown = True

    def _answer(self, delta: str) -> None:
        self._thought()
        self.full += delta
        full = self.full
        if not self.markdown:
            self.out.write(delta)
            self.out.flush()
            return
        safe = self.done + split_blocks(full[self.done:])
        if safe > self.done:
            block = full[self.done:safe].strip("\n")
            self.done = safe
            if block:
                self.live.console.print(Markdown(block))
        self.pending.text = full[self.done:]

    def __exit__(self, *exc) -> None:
        if self.splitter is not None:
            for kind, text in self.splitter.finish():
                (self._think if kind == "reasoning" else self._answer)(text)
            self._thought()
        if not self.markdown:
            if self.full and not self.full.endswith("\n"):
                self.out.write("\n")
            self.out.flush()
            return
        rest = self.full[self.done:].strip("\n")
        self.pending.text = ""
        self.live.stop()
        if rest:
            self.console.print(Markdown(rest))
