"""`chat --tools FILE`: the tools a chat offers the model, what each call it makes would run, and the
allow-list that decides what chat may run by itself (`--allow 'kubectl get *'`).

The tools file is a JSON list of OpenAI function tools. A call runs a command only through one of two
mappings, and only when that command matches an --allow pattern; nothing else ever runs:
- the tool's function carries "x-command": an argv template, e.g.
  ["kubectl", "get", "{resource}", ["-n", "{namespace}"]]: "{arg}" is replaced by the call's argument, a
  nested list is left out when an argument it names is absent. Values never split into words.
- a call whose arguments are one string "command" (a generic shell tool): that line, split like a
  shell splits words (shlex), run without a shell (no pipes, redirections, variables, globbing).
Patterns are matched word by word (fnmatch in each word); a last word "*" matches any remaining words.
Every other call is shown and waits for the user to run it and paste what it printed (/result).
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import subprocess
from pathlib import Path

from devops_cli.errors import DevopsError

EXTENSION = "x-command"
RUN_TIMEOUT_S = 60
MAX_RESULT_CHARS = 8000
MAX_TOOL_ROUNDS = 8  # replies in a row ending in calls that chat runs by itself (--allow) before it asks


def load_tools(path: str) -> tuple[list[dict], dict[str, list]]:
    """(OpenAI tools as sent to the model, {tool name: its x-command}) from a tools file."""
    from devops_cli.tools import tool_problems

    file = Path(path)
    if not file.is_file():
        raise DevopsError(f"tools file '{path}' not found", "--tools", "pass a JSON file: a list of OpenAI function tools")
    try:
        tools = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DevopsError(f"{path} is not JSON: {getattr(e, 'msg', e)}", "--tools") from None
    if isinstance(tools, dict) and isinstance(tools.get("tools"), list):
        tools = tools["tools"]  # a request body's {"tools": [...]}
    if not isinstance(tools, list) or not tools:
        raise DevopsError(f"{path} must hold a non-empty JSON list of OpenAI function tools", "--tools",
                          'e.g. [{"type": "function", "function": {"name": "kubectl_get", "parameters": {...}}}]')
    commands = {}
    sent = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and EXTENSION in fn:
            fn = dict(fn)
            template = fn.pop(EXTENSION)
            if not _template_ok(template):
                raise DevopsError(f"tools[{i}].function.{EXTENSION} must be a list of words and [optional, words]",
                                  f"{path}", 'e.g. ["kubectl", "get", "{resource}", ["-n", "{namespace}"]]')
            commands[fn.get("name")] = template
            tool = {**tool, "function": fn}
        sent.append(tool)
    problems = tool_problems(sent)
    if problems:
        where, what = problems[0]
        raise DevopsError(f"{where}: {what}", path, "fix the tool schema (OpenAI's function tool form)")
    return sent, commands


def _template_ok(template) -> bool:
    return isinstance(template, list) and bool(template) and all(
        isinstance(w, str) or (isinstance(w, list) and all(isinstance(x, str) for x in w)) for w in template)


def command_of(call: dict, commands: dict[str, list]) -> list[str] | None:
    """The argv a call maps to (x-command, or a "command" argument), or None."""
    try:
        args = json.loads(call["arguments"])
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(args, dict):
        return None
    template = commands.get(call["name"])
    if template is not None:
        argv = []
        for word in template:
            group = word if isinstance(word, list) else [word]
            try:
                filled = [w.format_map(_Values(args)) for w in group]
            except KeyError:
                if isinstance(word, list):
                    continue  # an optional group whose argument the call left out
                return None
            argv += filled
        return argv
    if set(args) == {"command"} and isinstance(args["command"], str):
        try:
            return shlex.split(args["command"])
        except ValueError:
            return None
    return None


class _Values(dict):
    def __missing__(self, key):
        raise KeyError(key)

    def __getitem__(self, key):
        value = super().__getitem__(key)
        return value if isinstance(value, str) else json.dumps(value)


def allowed(argv: list[str] | None, patterns: list[str]) -> str | None:
    """The --allow pattern that lets `argv` run, or None."""
    if not argv:
        return None
    for pattern in patterns:
        words = shlex.split(pattern)
        if words and words[-1] == "*":
            head, rest = words[:-1], True
        else:
            head, rest = words, False
        if len(argv) < len(head) or (not rest and len(argv) != len(head)):
            continue
        if all(fnmatch.fnmatchcase(a, w) for a, w in zip(argv, head)):
            return pattern
    return None


def check_patterns(patterns: list[str]) -> None:
    for pattern in patterns:
        try:
            words = shlex.split(pattern)
        except ValueError as e:
            raise DevopsError(f"--allow '{pattern}' cannot be split into words: {e}", "--allow") from None
        if not words or words[0] in ("*", "**") or any(c in words[0] for c in "*?["):
            raise DevopsError(f"--allow '{pattern}' must start with the program's name", "--allow",
                              "e.g. --allow 'kubectl get *'")


def run(argv: list[str]) -> str:
    """Run an allowed command (no shell, stdin closed, a time limit); its output as a tool result."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=RUN_TIMEOUT_S)
    except FileNotFoundError:
        return f"error: {argv[0]}: command not found"
    except subprocess.TimeoutExpired:
        return f"error: {shlex.join(argv)} did not finish in {RUN_TIMEOUT_S} s"
    out = (done.stdout + (("\n" if done.stdout else "") + done.stderr if done.stderr else "")).rstrip("\n")
    if len(out) > MAX_RESULT_CHARS:
        out = out[:MAX_RESULT_CHARS] + f"\n[… {len(out) - MAX_RESULT_CHARS} more characters cut]"
    return out + (f"\n[exit code {done.returncode}]" if done.returncode else "")


def shown(call: dict) -> str:
    """A call as one line: name(arguments JSON)."""
    return f"{call['name']}({call['arguments']})"


class Runner:
    """What chat does with each call: the command it maps to, whether --allow lets it run, its output."""

    def __init__(self, commands: dict[str, list] | None = None, allow: list[str] | None = None):
        self.commands, self.allow = commands or {}, allow or []

    def handle(self, call: dict) -> tuple[list[str] | None, str | None, str | None]:
        """(argv or None, the pattern that allowed it or None, its output when it ran) of an OpenAI tool call."""
        simple = {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
        argv = command_of(simple, self.commands)
        pattern = allowed(argv, self.allow)
        return argv, pattern, run(argv) if pattern else None


def show_call(call: dict, argv, pattern, output) -> None:
    """A call on the terminal: the call, the command it maps to, and whether it ran (with its output)."""
    from rich.markup import escape

    from devops_cli.console import console

    console.print(f"[bold magenta]tool call[/] {escape(call['function']['name'])}({escape(call['function']['arguments'])})",
                  soft_wrap=True)
    if argv:
        console.print(f"  [dim]$ {escape(shlex.join(argv))}[/]", soft_wrap=True)
    if output is not None:
        console.print(f"  [dim]ran (--allow '{escape(pattern)}'):[/]")
        console.print(escape(output), style="dim", soft_wrap=True)
    else:
        why = "no --allow pattern matches it" if argv else "no command for it (x-command in the tools file)"
        console.print(f"  [dim]not run: {why}[/]")
