"""`devops-model chat` as a user meets it: a real REPL process in a pseudo-terminal (pexpect) on the
real tiny model — prompt_toolkit input, streamed replies, /commands, Ctrl-C and Ctrl-D."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import pexpect
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # models loaded in fresh CLI processes
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>]")
STATS = re.compile(r"(\d+) tokens · [\d.]+ s · [\d.]+ tokens/s")


def plain(text: str) -> str:
    return re.sub(r"\r+\n", "\n", ANSI.sub("", text))


class Repl:
    def __init__(self, tmp_path, *args: str):
        self.env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "PROMPT_TOOLKIT_NO_CPR": "1",
                    "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "50"}
        self.child = pexpect.spawn(sys.executable, ["-m", "devops_cli", "chat", *args], cwd=str(ROOT),
                                   env=self.env, encoding="utf-8", codec_errors="replace",  # ^C flushes the tty mid-character
                                   dimensions=(50, 200), timeout=120)
        self.child.logfile_read = open(tmp_path / "repl.log", "a", encoding="utf-8")  # noqa: SIM115
        self.expect("devops-model chat")
        self.prompt()

    def expect(self, pattern):
        self.child.expect(pattern)
        return self.child

    def prompt(self) -> str:
        """Wait for the next >>> prompt; what was printed before it, without terminal codes."""
        self.child.expect(">>>")
        return plain(self.child.before)

    def say(self, message: str) -> int:
        """Send a message; wait for its stats line and the next prompt; the reply's token count."""
        self.child.sendline(message)
        self.child.expect(STATS)
        tokens = int(self.child.match.group(1))
        self.prompt()
        return tokens

    def command(self, line: str, until: str) -> str:
        """Run a /command, wait for `until` and then for the next prompt; the output up to `until`."""
        self.child.sendline(line)
        self.child.expect_exact(until)
        out = plain(self.child.before + until)
        self.prompt()
        return out

    def exit_code(self) -> int:
        self.child.sendeof()
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


def test_conversation_commands_and_transcripts(tiny_model, tmp_path):
    repl = Repl(tmp_path, "--model", str(tiny_model), "--max-new-tokens", "10", "--temperature", "1", "--seed", "7")

    # two turns: the second prompt carries the first question and the first reply
    repl.say("first question: why is the pod pending?")
    repl.say("second: my password=hunter2 leaked")
    out = repl.command("/prompt", "end of prompt")
    tokens = int(re.search(r"last prompt: (\d+) tokens", out).group(1))
    repl.command(f"/save {tmp_path / 't.json'}", "saved 2 turns")
    saved = json.loads((tmp_path / "t.json").read_text())
    first = saved["turns"][0]
    assert first["user"] == "first question: why is the pod pending?"
    assert (f"<|im_start|>user\n{first['user']}<|im_end|>\n<|im_start|>assistant\n{first['assistant']}<|im_end|>\n"
            "<|im_start|>user\nsecond: my password=hunter2 leaked<|im_end|>\n<|im_start|>assistant\n") in out
    assert saved["turns"][1]["prompt_tokens"] == tokens > first["prompt_tokens"] + 5
    # the transcript records model, seed and generation settings, with the secret redacted
    assert saved["model"] == str(tiny_model) and saved["seed"] == 7
    assert saved["generation"]["temperature"] == 1 and saved["generation"]["max_new_tokens"] == 10
    assert "hunter2" not in (tmp_path / "t.json").read_text()
    assert "password=[REDACTED]" in saved["turns"][1]["user"]
    history_file = tmp_path / "state" / "devops-model" / "chat_history"
    assert "first question" in history_file.read_text() and "hunter2" not in history_file.read_text()

    # mistakes: one line each, and the session goes on
    assert "error: unknown command /histroy — did you mean /history?" in repl.command("/histroy", "/history?")
    assert "error: temperature must be a number >= 0" in repl.command("/set temperature hot", "got 'hot'")
    assert "error: unknown setting 'temprature'" in repl.command("/set temprature 1", "temperature?")
    assert "t.json' exists" in repl.command(f"/save {tmp_path / 't.json'}", "--force to overwrite it")
    assert "error: cannot read" in repl.command(f"/load {tmp_path / 'nope.md'}", "No such file or directory")

    # /set temperature (0 = greedy), shown by /set
    repl.command("/set temperature 0", "greedy")
    settings = repl.command("/set", "stats")
    assert re.search(r"temperature\s+0\b", settings) and re.search(r"do_sample\s+False", settings)

    # /system changes the prompt of the next reply
    repl.command("/system You are an SRE who answers in haiku.", "system prompt set")
    repl.say("third")
    out = repl.command("/prompt", "end of prompt")
    assert "<|im_start|>system\nYou are an SRE who answers in haiku.<|im_end|>" in out
    assert "first question: why is the pod pending?" in out

    # Markdown save, /clear, /load round trip
    repl.command(f"/save {tmp_path / 't.md'}", "saved 3 turns")
    repl.command("/clear", "conversation cleared")
    repl.command("/history", "no turns yet")
    repl.command(f"/load {tmp_path / 't.md'}", "loaded 3 turns")
    history = repl.command("/history", "3. you")
    assert "1. you: first question: why is the pod pending?" in history
    repl.say("fourth")
    out = repl.command("/prompt", "end of prompt")
    assert "You are an SRE who answers in haiku." in out and "first question: why is the pod pending?" in out
    from devops_cli.chat import transcript  # the Markdown transcript holds the same turns as the JSON one

    loaded = transcript.load(tmp_path / "t.md")
    assert [(t["user"], t["assistant"]) for t in loaded["turns"][:2]] == [
        (t["user"], t["assistant"]) for t in saved["turns"]]

    # a small window: the oldest turns leave it, the user is told, /history marks them
    repl.child.sendline("/set max_window 70")
    repl.prompt()
    repl.child.sendline("fifth question")
    repl.expect("left the 70-token window")
    repl.expect(STATS)
    repl.prompt()
    assert "(out of window)" in repl.command("/history", "5. you")
    out = repl.command("/prompt", "end of prompt")
    assert "first question" not in out and "fifth question" in out
    assert int(re.search(r"last prompt: (\d+) tokens", out).group(1)) <= 70

    assert repl.exit_code() == 0


def test_ctrl_c_stops_a_long_reply_and_the_session_goes_on(tiny_model, tmp_path):
    repl = Repl(tmp_path, "--model", str(tiny_model), "--max-new-tokens", "3000", "--temperature", "1")
    repl.command("/set min_new_tokens 3000", "min_new_tokens = 3000")  # no early stop: a long reply
    repl.child.sendline("tell me everything about kubernetes")
    repl.child.expect_exact("kubernetes")  # the line is echoed ...
    time.sleep(1)  # ... and the reply is streaming (3000 tokens take 3.5-5 s at the tiny model's ~600-850 tokens/s)
    repl.child.sendintr()
    repl.expect("reply stopped")
    repl.child.expect(STATS)
    stopped_at = int(repl.child.match.group(1))
    assert 0 < stopped_at < 3000
    repl.prompt()

    repl.command("/set min_new_tokens 0", "min_new_tokens = 0")
    repl.command("/set max_new_tokens 5", "max_new_tokens = 5")
    assert repl.say("short one now") <= 5
    history = repl.command("/history", "2. you")
    assert "1. you: tell me everything about kubernetes" in history and "(stopped)" in history

    # multi-line input between triple quotes is one message
    repl.child.sendline('"""')
    repl.child.sendline("line one")
    repl.child.sendline('line two"""')
    repl.child.expect(STATS)
    repl.prompt()
    assert "3. you: line one line two" in repl.command("/history", "line one line two")

    # Ctrl-C at the prompt only clears the line; Ctrl-D leaves with 0
    repl.child.send("half typed")
    repl.child.sendintr()
    repl.prompt()
    history = repl.command("/history", "line one line two").split("1. you", 1)[1]
    assert "half typed" not in history
    assert repl.exit_code() == 0


def test_exit_command(tiny_model, tmp_path):
    repl = Repl(tmp_path, "--model", str(tiny_model), "--max-new-tokens", "4")
    repl.child.sendline("/exit")
    repl.child.expect(pexpect.EOF)
    repl.child.close()
    assert repl.child.exitstatus == 0
