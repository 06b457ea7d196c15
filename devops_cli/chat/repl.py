"""The interactive front end of `devops-model chat`: line editing and input history (prompt_toolkit),
/commands, multi-line input between triple quotes, replies streamed through render.ReplyView.

Ctrl-C at the prompt clears the line; Ctrl-C during a reply stops that reply and keeps the session;
Ctrl-D (or /exit) leaves with exit code 0. Mistakes (unknown /command, bad /set value, unreadable
file) print one red line and the session goes on.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from rich.markup import escape

from devops_cli.chat import transcript
from devops_cli.chat.render import ReplyView
from devops_cli.chat.session import ChatSession
from devops_cli.chat.settings import SETTINGS
from devops_cli.console import console, fail, fail_all, warn
from devops_cli.errors import DevopsError, did_you_mean
from devops_cli.outputs import new_output_file

HELP = [
    ("/help", "this list"),
    ("/clear", "forget the conversation (the system prompt stays)"),
    ("/system [TEXT]", "show or set the system prompt"),
    ("/set [NAME VALUE]", f"show or change a setting: {', '.join(SETTINGS)}, seed, max_window, stats on|off"),
    ("/history", "the turns so far (those that left the window are marked)"),
    ("/prompt", "the exact prompt of the last reply, as the model saw it"),
    ("/regen", "answer the last question again"),
    ("/think, /no_think", "thinking models: think before answering, or answer at once (enable_thinking)"),
    ("/result [TEXT]", "--tools: the result of the model's call that waits (no TEXT: paste lines, end with \"\"\")"),
    ("/save FILE [--force]", "write the transcript: FILE.json as JSON, else Markdown (secrets redacted)"),
    ("/load FILE", "resume a saved transcript"),
    ("/exit", "leave (Ctrl-D works too)"),
]
COMMANDS = ["help", "clear", "system", "set", "history", "prompt", "regen", "think", "no_think", "result", "save", "load",
            "exit", "quit", "bye"]


def history_file() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "devops-model" / "chat_history"


def _reader():
    """A function prompt -> line: prompt_toolkit on a terminal (history redacted on disk), input() else."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return input
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    class RedactingFileHistory(FileHistory):
        def store_string(self, string: str) -> None:
            super().store_string(transcript.redact(string)[0])

    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        history = RedactingFileHistory(str(path))
    except OSError:
        history = InMemoryHistory()
    session = PromptSession(history=history)
    return lambda prompt: session.prompt(prompt)


class Repl:
    def __init__(self, session: ChatSession, stats: bool = True, runner=None):
        from devops_cli.chat.toolrun import Runner

        self.session = session
        self.stats = stats
        self.runner = runner or Runner()
        self.rounds = 0  # replies in a row that ended in calls chat ran by itself
        self.read = _reader()

    def run(self) -> int:
        s = self.session
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # started as a background job of a non-interactive shell (`cmd &` in a script), which ignores
            # SIGINT: the REPL promises that Ctrl-C stops a reply, so it takes Ctrl-C back
            signal.signal(signal.SIGINT, signal.default_int_handler)
        console.print(f"[bold]devops-model chat[/] · {escape(s.model_name)}"
                      + (f" + {escape(s.adapter)}" if s.adapter else "")
                      + f" · window {s.window()} tokens · seed {s.seed}", soft_wrap=True)
        console.print('[dim]/help for commands · """ for multi-line input · Ctrl-C stops a reply · Ctrl-D exits[/]')
        if s.tools:
            allow = ", ".join(f"'{p}'" for p in self.runner.allow) or "nothing (each call waits for /result)"
            console.print(f"[dim]tools: {escape(', '.join(t['function']['name'] for t in s.tools))} · runs: "
                          f"{escape(allow)}[/]", soft_wrap=True)
        while True:
            try:
                line = self.read_message()
            except KeyboardInterrupt:
                continue
            except EOFError:
                console.print()
                return 0
            if line is None:
                continue
            try:
                if self.dispatch(line) == "exit":
                    return 0
            except DevopsError as e:
                fail_all(e)
            except KeyboardInterrupt:
                console.print("[dim]interrupted[/]")
            except Exception as e:  # keep the session: the conversation is worth more than one failure
                if os.environ.get("DEVOPS_MODEL_DEBUG"):
                    raise
                fail(f"internal error: {type(e).__name__}: {e} (DEVOPS_MODEL_DEBUG=1 shows the traceback)")

    def read_message(self) -> str | None:
        """One message: a line, or everything between triple quotes."""
        line = self.read(">>> ")
        if not line.strip():
            return None
        if not line.lstrip().startswith('"""'):
            return line.strip()
        body = line.lstrip()[3:]
        if body.rstrip().endswith('"""') and body.strip() != "":
            return body.rstrip()[:-3].strip("\n") or None
        lines = [body] if body else []
        while True:
            more = self.read("... ")
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                break
            lines.append(more)
        return "\n".join(lines).strip("\n") or None

    def dispatch(self, line: str) -> str | None:
        word, _, arg = line.partition(" ")
        # "/var/log/syslog is full" is a message, not a command
        if not word.startswith("/") or "/" in word[1:] or len(word) == 1:
            self.answer(lambda on_text: self.session.send(line, on_text, self.dropped))
            return None
        name, arg = word[1:].lower(), arg.strip()
        if name not in COMMANDS:
            hint = did_you_mean(name, COMMANDS, quote="")
            raise DevopsError(f"unknown command {word}", hint=hint.replace("mean ", "mean /") if hint else "type /help")
        if name in ("exit", "quit", "bye"):
            return "exit"
        getattr(self, f"cmd_{name}")(arg)
        return None

    # --- replies ---------------------------------------------------------------------------------
    def dropped(self, count: int, window: int) -> None:
        warn(f"{count} oldest turn{'s' if count > 1 else ''} left the {window}-token window; "
             "the model no longer sees them (/history shows which)")

    def answer(self, generate) -> None:
        s = self.session
        with ReplyView(console, thinking=s.thinking, in_think=lambda: s.prompt_opens_thinking) as view:
            reply = generate(view.update)
        if reply.stopped:
            console.print("[yellow]⏹ reply stopped[/] [dim](kept in the history; /regen answers again)[/]")
        if self.stats:
            first = f" · first token {reply.first_token_seconds:.2f} s" if reply.first_token_seconds else ""
            console.print(f"[dim]{reply.completion_tokens} tokens · {reply.seconds:.2f} s · "
                          f"{reply.tokens_per_second:.1f} tokens/s{first}[/]")
        console.print()
        self.calls()

    def calls(self) -> None:
        """The model's calls: each shown; allowed commands run and the model goes on, the others wait for /result."""
        from devops_cli.chat.toolrun import MAX_TOOL_ROUNDS, show_call

        s = self.session
        if not s.pending():
            self.rounds = 0
            return
        waiting = False
        for call in s.pending():
            argv, pattern, output = self.runner.handle(call)
            show_call(call, argv, pattern, output)
            if output is not None:
                s.result(call["id"], output)
            waiting = waiting or output is None
        if waiting:
            console.print('[dim]run it yourself, then give what it printed: /result TEXT (or /result, then lines, '
                          'then """)[/]')
        elif self.rounds + 1 >= MAX_TOOL_ROUNDS:
            console.print(f"[yellow]{MAX_TOOL_ROUNDS} replies in a row ended in calls; /result … or a message goes on[/]")
        else:
            self.rounds += 1
            self.answer(lambda on_text: s.resume(on_text, self.dropped))

    # --- commands --------------------------------------------------------------------------------
    def cmd_help(self, arg: str) -> None:
        for usage, text in HELP:
            console.print(f"  [bold]{escape(usage):<22}[/] {escape(text)}")
        console.print('  [bold]"""[/]                    start and end a multi-line message')

    def cmd_clear(self, arg: str) -> None:
        self.session.clear()
        console.print("[dim]conversation cleared[/]")

    def cmd_system(self, arg: str) -> None:
        if arg:
            self.session.system = arg
            console.print("[dim]system prompt set (it applies from the next reply)[/]")
        else:
            console.print(f"system: {escape(self.session.system)}", soft_wrap=True)

    def cmd_set(self, arg: str) -> None:
        parts = arg.split()
        if not parts:
            for name, value in {**self.session.describe(), "stats": "on" if self.stats else "off"}.items():
                console.print(f"  {name:<20} {value}")
            return
        if len(parts) != 2:
            raise DevopsError("usage: /set NAME VALUE, e.g. /set temperature 0.7")
        name, value = parts[0].lower(), parts[1]
        if name == "stats":
            if value.lower() not in ("on", "off"):
                raise DevopsError(f"stats must be on or off, got '{value}'")
            self.stats = value.lower() == "on"
            console.print(f"[dim]stats = {value.lower()}[/]")
            return
        console.print(f"[dim]{escape(self.session.set(name, value))}[/]")

    def cmd_history(self, arg: str) -> None:
        s = self.session
        if not s.turns:
            console.print("[dim]no turns yet[/]")
        for i, turn in enumerate(s.turns, 1):
            mark = " [dim](out of window)[/]" if i <= s.first_in_window else ""
            console.print(f"[bold]{i}. you[/]{mark}: {escape(_short(turn.user))}", soft_wrap=True)
            console.print(f"   [bold]assistant[/]: {escape(_short(turn.assistant))}"
                          + (" [dim](stopped)[/]" if turn.stopped else ""), soft_wrap=True)

    def cmd_prompt(self, arg: str) -> None:
        s = self.session
        if not s.last_prompt:
            raise DevopsError("no prompt yet: send a message first")
        console.print(f"[dim]last prompt: {s.last_prompt_tokens} tokens (window {s.window()})[/]")
        console.print(s.last_prompt, markup=False, highlight=False, soft_wrap=True)
        console.print("[dim]end of prompt[/]")

    def cmd_think(self, arg: str) -> None:
        console.print(f"[dim]{escape(self.session.think(True))}[/]")

    def cmd_no_think(self, arg: str) -> None:
        console.print(f"[dim]{escape(self.session.think(False))}[/]")

    def cmd_result(self, arg: str) -> None:
        s = self.session
        waiting = s.pending()
        if not waiting:
            raise DevopsError("no tool call waits for a result", hint="/result answers a call the model made (chat --tools)")
        if not arg:
            lines = []
            while (line := self.read("... ")).strip() != '"""':
                lines.append(line)
            arg = "\n".join(lines)
        s.result(waiting[0]["id"], arg)
        console.print(f"[dim]result of {escape(waiting[0]['function']['name'])} recorded[/]")
        if not s.pending():
            self.rounds = 0
            self.answer(lambda on_text: s.resume(on_text, self.dropped))

    def cmd_regen(self, arg: str) -> None:
        self.answer(lambda on_text: self.session.regen(on_text, self.dropped))

    def cmd_save(self, arg: str) -> None:
        parts = arg.split()
        force = "--force" in parts
        parts = [p for p in parts if p != "--force"]
        if len(parts) != 1:
            raise DevopsError("usage: /save FILE [--force]  (FILE.json: JSON, anything else: Markdown)")
        reads = {"model": self.session.model_name, "adapter": self.session.adapter}
        path = new_output_file(parts[0], force, None, "--force", inputs=reads)  # never the model, never a device
        count = transcript.save(self.session.state(), path)
        kind = "JSON" if path.suffix.lower() == ".json" else "Markdown"
        note = f"; {count} secret{'s' if count != 1 else ''} redacted" if count else ""
        console.print(f"[dim]saved {len(self.session.turns)} turns to {escape(str(path))} ({kind}{note})[/]")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise DevopsError("usage: /load FILE")
        path = Path(arg).expanduser()
        state = transcript.load(path)
        s = self.session
        if state.get("model") and state["model"] != s.model_name:
            warn(f"the transcript was made with '{state['model']}', this session runs '{s.model_name}'")
        s.restore(state)
        console.print(f"[dim]loaded {len(s.turns)} turns from {escape(str(path))} "
                      f"(seed then: {state.get('seed')}; generation settings restored)[/]")


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
