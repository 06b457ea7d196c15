"""Chat transcripts (Markdown or JSON, both loadable again) and secret redaction.

Everything written to disk by the chat — /save transcripts and the input history file — passes
through redact() first: passwords, tokens, API keys, private keys and URL credentials become
[REDACTED]. A transcript records the model, adapter, seed and generation settings so a session can
be resumed (/load) or reproduced.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from devops_cli.errors import DevopsError, first_line
from devops_cli.outputs import write_file

REDACTED = "[REDACTED]"
_HARMLESS = re.compile(r"\d{1,7}|true|false|null|none|yes|no|on|off|bearer|basic|\*+|<.*|\$\{?\w+\}?", re.I)
_KEY = r"(?:password|passwd|pwd|passphrase|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|client[_-]?secret|auth)"
_PATTERNS = [
    # -----BEGIN ... PRIVATE KEY----- blocks
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S),
     lambda m: REDACTED),
    # scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]+:)([^\s@/]+)(@)", re.I), lambda m: m[1] + REDACTED + m[3]),
    # Authorization: Bearer xxx / Basic xxx
    (re.compile(r"\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}", re.I), lambda m: m[1] + m[2] + REDACTED),
    # "password": "x" / password=x / DB_PASSWORD: x / --password x / api_key='x'
    (re.compile(rf"""(["']?[\w.-]*{_KEY}[\w.-]*["']?\s*[:=]\s*)(["']?)([^\s"',;]+)\2""", re.I),
     lambda m: m[1] + m[2] + REDACTED + m[2]),
    (re.compile(rf"(--[\w-]*{_KEY}[\w-]*[ =])(\S+)", re.I), lambda m: m[1] + REDACTED),
    # well-known token shapes
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), lambda m: REDACTED),  # AWS access key id
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bgithub_pat_[A-Za-z0-9_]{30,}\b"), lambda m: REDACTED),
    (re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}\b"), lambda m: REDACTED),  # GitLab
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"), lambda m: REDACTED),  # Slack
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"), lambda m: REDACTED),  # OpenAI-style
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), lambda m: REDACTED),  # Hugging Face
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), lambda m: REDACTED),  # Google API key
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), lambda m: REDACTED),  # JWT
]


def redact(text: str) -> tuple[str, int]:
    """text with obvious secrets replaced by [REDACTED], and how many were replaced."""
    count = 0

    def sub(m, repl):
        nonlocal count
        if REDACTED in m[0] or _HARMLESS.fullmatch(m[m.lastindex] if m.lastindex else "x"):
            return m[0]
        count += 1
        return repl(m)

    for pattern, repl in _PATTERNS:
        text = pattern.sub(lambda m, repl=repl: sub(m, repl), text)
    return text, count


def _redact_state(state: dict) -> tuple[dict, int]:
    count = 0

    def clean(value: str) -> str:
        nonlocal count
        value, n = redact(value)
        count += n
        return value

    out = {**state, "system": clean(state.get("system") or "")}
    out["turns"] = [{**t, "user": clean(t["user"]), "assistant": clean(t["assistant"])} for t in state["turns"]]
    return out, count


# --- Markdown: readable as is; HTML comments (invisible when rendered) make it loadable -----------
_META = "<!-- devops-model-chat "
_MARK = re.compile(r"^<!-- (system|user|assistant) -->$", re.M)
_HEADINGS = {"system": "### System", "user": "### You", "assistant": "### Assistant"}


def to_markdown(state: dict) -> str:
    meta = {k: v for k, v in state.items() if k not in ("turns", "system")}
    lines = [f"{_META}{json.dumps(meta, ensure_ascii=False)} -->", "# devops-model chat", "",
             f"- model: `{state['model']}`" + (f" + adapter `{state['adapter']}`" if state.get("adapter") else ""),
             f"- seed: {state['seed']}", f"- generation: `{json.dumps(state['generation'])}`",
             f"- saved: {state['saved']}", ""]
    blocks = [("system", state.get("system") or "")]
    for t in state["turns"]:
        blocks += [("user", t["user"]), ("assistant", t["assistant"] + ("\n\n*(stopped)*" if t.get("stopped") else ""))]
    for role, text in blocks:
        lines += [f"<!-- {role} -->", _HEADINGS[role], "", text, ""]
    return "\n".join(lines)


def from_markdown(text: str, where: str) -> dict:
    first, _, _ = text.partition("\n")
    if not first.startswith(_META):
        raise DevopsError("not a devops-model chat transcript (no header comment)", where=where)
    meta = json.loads(first[len(_META):].rsplit("-->", 1)[0])
    parts = _MARK.split(text)
    state = {**meta, "system": "", "turns": []}
    for role, body in zip(parts[1::2], parts[2::2], strict=True):
        body = body.strip("\n")
        heading = _HEADINGS[role]
        body = body[len(heading):].strip("\n") if body.startswith(heading) else body
        if role == "system":
            state["system"] = body
        elif role == "user":
            state["turns"].append({"user": body, "assistant": ""})
        elif state["turns"]:
            stopped = body.endswith("*(stopped)*")
            state["turns"][-1].update(assistant=body.removesuffix("*(stopped)*").rstrip("\n"), stopped=stopped)
    return state


def save(state: dict, path: Path) -> int:
    """Write the transcript (JSON for *.json, else Markdown), secrets redacted; returns the count."""
    state, count = _redact_state({**state, "saved": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    text = json.dumps(state, ensure_ascii=False, indent=2) + "\n" if path.suffix.lower() == ".json" else to_markdown(state)
    write_file(path, text, None)  # atomic; a full disk or an unwritable place is one line
    return count


def load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DevopsError(f"cannot read '{path}': {getattr(e, 'strerror', None) or e}") from None
    try:
        state = json.loads(text) if path.suffix.lower() == ".json" else from_markdown(text, str(path))
    except (json.JSONDecodeError, ValueError) as e:
        raise DevopsError(f"not a valid transcript: {first_line(e)}", where=str(path)) from None
    if not isinstance(state, dict) or not isinstance(state.get("turns"), list) or not all(
            isinstance(t, dict) and isinstance(t.get("user"), str) and isinstance(t.get("assistant"), str)
            for t in state["turns"]):
        raise DevopsError("not a devops-model chat transcript (no turns with user/assistant text)", where=str(path))
    generation = state.get("generation") or {}
    if not isinstance(generation, dict):
        raise DevopsError("'generation' must be a mapping of settings", where=str(path))
    from devops_cli.chat.settings import SETTINGS, parse_setting

    for name, value in generation.items():  # the same rules as /set: a bad value never reaches a turn
        if name in SETTINGS:
            try:
                parse_setting(name, str(value).lower() if isinstance(value, bool) else str(value))
            except DevopsError as e:
                raise DevopsError(f"generation setting {e.message}", where=str(path), hint="fix or remove it") from None
    for key, kind in (("seed", int), ("max_window", int), ("system", str)):
        if state.get(key) is not None and not isinstance(state[key], kind) or isinstance(state.get(key), bool):
            raise DevopsError(f"'{key}' must be {'an integer' if kind is int else 'text'}, got {state[key]!r}",
                              where=str(path), hint="fix or remove it")
    return state
