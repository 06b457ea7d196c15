"""Tool calling, one rule in one place for the data checks, sft, serve and chat (no torch here).

- Tools are OpenAI function tools, {"type": "function", "function": {"name", "description"?,
  "parameters"? (a JSON Schema object), "strict"?}}; LLaMA-Factory's bare {"name", ...} form is
  wrapped (`normalize_tools`). `tool_problems` says what is wrong with a list of them.
- A model calls a tool as Qwen's templates teach it (the "hermes" format vLLM parses):
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call (parallel calls are
  several blocks). `CallStream` reads calls out of a reply as it streams; `parse` is the same on a whole
  reply, so both give the same answer. A block that is not a call to a given tool with a JSON-object for
  arguments stays in the reply as text, never an error.
- Conversations carrying calls and results (OpenAI's assistant `tool_calls`, `role: tool`) go to the
  template with arguments as JSON objects (`for_template`: Qwen2.5's template writes them with tojson,
  Qwen3's takes either).
- `template_for`: the model's own template when it renders tools, else Qwen2.5-Instruct's tool template
  (with ChatML's default system prompt) for a ChatML model (Qwen2 chat models, CodeFuse-DevOps-Model),
  else a DevopsError.
"""

from __future__ import annotations

import json
import re
import uuid

from devops_cli.errors import DevopsError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
_PROBE = "devops_model_probe_tool"


# ----------------------------------------------------------------------------------------------
# Tool definitions
# ----------------------------------------------------------------------------------------------
def normalize_tools(tools) -> list[dict]:
    """OpenAI-form tools from a list of OpenAI tools or LLaMA-Factory's bare functions (a JSON string of
    either is read too). Keys that are null are dropped (a dataset loader fills absent ones with null).
    Raises ValueError with what is wrong."""
    if isinstance(tools, str):
        if not tools.strip():
            return []
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"tools is not JSON: {e.msg} (column {e.colno})") from None
    if tools is None:
        return []
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of function tools, got {_kind(tools)}")
    out = []
    for tool in tools:
        if isinstance(tool, dict) and "function" not in tool and "name" in tool:  # LLaMA-Factory's bare function
            tool = {"type": "function", "function": tool}
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            tool = {**_present(tool), "function": _present(tool["function"])}
        out.append(tool)
    problems = tool_problems(out)
    if problems:
        raise ValueError("{}: {}".format(*problems[0]))
    return out


def tool_problems(tools: list) -> list[tuple[str, str]]:
    """(where, what) for each thing wrong with a list of OpenAI tools, where as `tools[i].function.name`
    (`what` does not repeat it)."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            out.append((at, f"must be an object, got {_kind(tool)}"))
            continue
        if tool.get("type") != "function":
            out.append((f"{at}.type", f"must be 'function', got {tool.get('type')!r}"))
            continue
        if set(tool) - {"type", "function"}:
            out.append((at, f"has unknown key(s) {', '.join(sorted(set(tool) - {'type', 'function'}))}"))
        fn = tool.get("function")
        if not isinstance(fn, dict):
            out.append((f"{at}.function", f"must be an object with a name, got {_kind(fn)}"))
            continue
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            out.append((f"{at}.function.name", f"{name!r} is not a function name (1-64 letters, digits, _ or -)"))
        elif name in seen:
            out.append((f"{at}.function.name", f"'{name}' is defined twice"))
        else:
            seen.add(name)
        if set(fn) - FUNCTION_KEYS:
            out.append((f"{at}.function", f"has unknown key(s) {', '.join(sorted(set(fn) - FUNCTION_KEYS))}"))
        if "description" in fn and not isinstance(fn["description"], str):
            out.append((f"{at}.function.description", "must be a string"))
        if "strict" in fn and not isinstance(fn["strict"], (bool, type(None))):
            out.append((f"{at}.function.strict", "must be true or false"))
        if "parameters" in fn:
            why = schema_problem(fn["parameters"])
            if why:
                out.append((f"{at}.function.parameters", why))
    return out


def schema_problem(schema) -> str | None:
    """What makes `schema` unusable as a function's parameters (a JSON Schema of an object), or None."""
    if not isinstance(schema, dict):
        return f"must be a JSON Schema object, got {_kind(schema)}"
    if schema.get("type", "object") != "object":
        return f"must describe an object (\"type\": \"object\"), got type {schema.get('type')!r}"
    props = schema.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
        return "'properties' must map each argument name to a schema object"
    required = schema.get("required", [])
    if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        return "'required' must be a list of argument names"
    missing = [r for r in required if props and r not in props]
    if missing:
        return f"'required' names {', '.join(missing)}, which 'properties' does not define"
    for name, sub in props.items():
        kind = sub.get("type")
        kinds = kind if isinstance(kind, list) else [kind]
        if kind is not None and not all(k in JSON_TYPES for k in kinds):
            return f"property '{name}' has type {kind!r}, not a JSON Schema type"
    return None


JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


# ----------------------------------------------------------------------------------------------
# Calls in a reply
# ----------------------------------------------------------------------------------------------
def read_call(text: str, known=None) -> dict | None:
    """{"name", "arguments" (a JSON string)} of one call block's JSON, or None when it is not a call (not
    JSON, no name, arguments not an object, a name not among `known`)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict) or (known is not None and call["name"] not in known):
        return None
    return {"name": call["name"], "arguments": json.dumps(args, ensure_ascii=False)}


class CallStream:
    """Feed a reply's text as it comes (`add`), then `finish`; each returns events, ("content", text) or
    ("call", {"name", "arguments"}). A call is given once its `</tool_call>` has arrived (or the reply
    ended) and it parsed; a malformed block comes back as content, as it was written. Whitespace around
    calls is dropped; a partial `<tool_call>` tag at the end of a delta is held back until it is whole."""

    def __init__(self, known=None, first: bool = False):
        self.known = None if known is None else set(known)
        self.inside = first  # the reply starts inside a call (a generation prompt that opened one)
        self.buf = ""
        self.ws = ""  # whitespace held back: dropped if a call follows or the reply ends after calls
        self.calls = 0
        self.after_call = False

    def add(self, text: str) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        self.buf += text
        while self.buf:
            if self.inside:
                end = self.buf.find(CLOSE)
                if end < 0:
                    break
                self._block(self.buf[:end], True, out)
                self.buf, self.inside = self.buf[end + len(CLOSE):], False
                continue
            start = self.buf.find(OPEN)
            if start >= 0:
                self._content(self.buf[:start], out, drop_ws=True)
                self.buf, self.inside = self.buf[start + len(OPEN):], True
                continue
            keep = _partial(self.buf, OPEN)
            self._content(self.buf[: len(self.buf) - keep], out)
            self.buf = self.buf[len(self.buf) - keep:]
            break
        return out

    def finish(self) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        rest, self.buf = self.buf, ""
        if self.inside:  # cut off before its closing tag (max_tokens): a call if what came is whole
            self._block(rest, False, out)
        else:
            self._content(rest, out)
            if not self.calls and self.ws:
                out.append(("content", self.ws))
        self.ws = ""
        return out

    def _block(self, body: str, closed: bool, out: list) -> None:
        call = read_call(body, self.known)
        if call is None:
            self._content(OPEN + body + (CLOSE if closed else ""), out)
            return
        self.ws = ""
        self.calls += 1
        self.after_call = True
        out.append(("call", call))

    def _content(self, text: str, out: list, drop_ws: bool = False) -> None:
        if self.after_call:  # text right after a call starts at its first word
            text = text.lstrip()
            self.after_call = not text
        body = text.rstrip()
        if body:
            out.append(("content", self.ws + body))
            self.ws = ""
        self.ws += text[len(body):]
        if drop_ws:
            self.ws = ""


def parse(text: str, known=None, first: bool = False) -> tuple[str, list[dict]]:
    """(content, calls) of a whole reply: what CallStream gives for it."""
    stream = CallStream(known, first)
    events = stream.add(text) + stream.finish()
    return "".join(e for kind, e in events if kind == "content"), [e for kind, e in events if kind == "call"]


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def openai_call(call: dict, cid: str | None = None) -> dict:
    """A call as OpenAI's message.tool_calls has it."""
    return {"id": cid or call_id(), "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]}}


def opening(name: str | None = None) -> str:
    """What a generation prompt adds to force a call (tool_choice required: any tool; named: that one).
    It stops before the space that precedes the arguments: byte-level BPEs merge that space into the
    next token (` {"`), and a prompt ending in a lone space token would be one the model never saw."""
    return OPEN + "\n" + (f'{{"name": "{name}", "arguments":' if name else "")


# ----------------------------------------------------------------------------------------------
# Calls in training data
# ----------------------------------------------------------------------------------------------
def data_calls(value) -> list[dict]:
    """The calls of a data record's assistant turn as [{"name", "arguments" (JSON string)}]: LLaMA-Factory's
    function_call content (the JSON of one call or a list of calls) or OpenAI's tool_calls list. Raises
    ValueError saying what is wrong (not JSON, no name, arguments that are not a JSON object)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"the call is not JSON: {e.msg} (column {e.colno})") from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise ValueError("no call in it")
    out = []
    for call in calls:
        fn = _fn(call) if isinstance(call, dict) else call
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"a call must be {{\"name\": ..., \"arguments\": {{...}}}}, got {json.dumps(call)[:60]}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise ValueError(f"the arguments of the call to '{fn['name']}' are not JSON: {e.msg}") from None
        if not isinstance(args, dict):
            raise ValueError(f"the arguments of the call to '{fn['name']}' must be a JSON object, got {_kind(args)}")
        out.append({"name": fn["name"], "arguments": json.dumps(args, ensure_ascii=False)})
    return out


# ----------------------------------------------------------------------------------------------
# Conversations for the template
# ----------------------------------------------------------------------------------------------
def arguments_object(arguments):
    """A call's arguments as the template writes them: the JSON object of a JSON string, else as given."""
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return arguments


def for_template(messages: list[dict]) -> list[dict]:
    """Messages with tool calls as Qwen-family templates read them: {"type": "function", "function":
    {"name", "arguments": object}}, content "" where a message has none."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if not calls and m.get("content") is not None:
            out.append(m)
            continue
        m = {**m, "content": m.get("content") or ""}
        if calls:
            m["tool_calls"] = [{**({"id": c["id"]} if c.get("id") else {}), "type": "function",
                                "function": {"name": _fn(c)["name"], "arguments": arguments_object(_fn(c).get("arguments", {}))}}
                               for c in calls]
        else:
            m.pop("tool_calls", None)
        out.append(m)
    return out


def uses_tools(messages: list[dict], tools) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def renders_tools(tokenizer, template: str | None = None) -> bool:
    """The template writes the tools it is given (probed by rendering one)."""
    tool = {"type": "function", "function": {"name": _PROBE, "parameters": {"type": "object", "properties": {}}}}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], tools=[tool], tokenize=False,
                                             add_generation_prompt=True, chat_template=template)
    except Exception:  # a template that cannot render with tools
        return False
    return _PROBE in text


def prepare(tokenizer, messages: list[dict], tools) -> tuple[list[dict], dict]:
    """(messages, apply_chat_template kwargs) of a conversation with tools or tool calls: calls as the
    template reads them, the tools, and the template (template_for)."""
    return for_template(messages), {"tools": tools or None, "chat_template": template_for(tokenizer)}


def template_for(tokenizer) -> str | None:
    """The template to render tool conversations with: None (the tokenizer's own renders tools), ChatML with
    Qwen2.5's tools (templates.CHATML_TOOLS) for a ChatML tokenizer, else DevopsError."""
    cached = getattr(tokenizer, "_devops_tool_template", False)
    if cached is not False:
        return cached
    from devops_cli.templates import CHATML_TOOLS, has_chatml_tokens

    if renders_tools(tokenizer):
        chosen = None
    elif has_chatml_tokens(tokenizer):
        chosen = CHATML_TOOLS
    else:
        raise DevopsError(f"the chat template of '{tokenizer.name_or_path}' renders no tools, and the model has no "
                          "ChatML tokens for Qwen2.5's tool template",
                          hint="use a model whose chat template takes tools (Qwen2.5/Qwen3 instruct models)")
    try:
        tokenizer._devops_tool_template = chosen
    except AttributeError:
        pass
    return chosen


def _fn(call: dict) -> dict:
    return call["function"] if isinstance(call.get("function"), dict) else call


def _present(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _partial(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (a tag cut between deltas)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _kind(value) -> str:
    names_ = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
              float: "a number", type(None): "null"}  # fmt: skip
    return names_.get(type(value), type(value).__name__)
