"""The ollama Modelfile of an exported GGUF: FROM, a TEMPLATE in ollama's Go-template language that
renders what the model's own chat template renders, a PARAMETER stop per end-of-turn token, the
generation defaults, the default system prompt.

The TEMPLATE is not translated from Jinja (no general translation exists): devops-model carries Go
templates for the chat-template families it trains with (ChatML as Qwen2/Qwen2.5/CodeFuse ship it,
with any default system prompt; Qwen3's hybrid-thinking template with tools) and picks the one that
renders the model's own template's output on probe conversations, run through ollama's own steps
(the Modelfile's SYSTEM put first when a chat has none, then .System / .Messages / .Tools / .Think,
see `ollama_values`). A model whose template none of them reproduces gets no Modelfile: one line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from devops_cli.errors import DevopsError
from devops_cli.export.gotemplate import TemplateError, render

CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

# Qwen3's hybrid-thinking template (the one Qwen3's post-trained checkpoints ship): the system message
# and the tools in one system turn; earlier turns' thinking dropped; <think></think> when thinking is
# turned off (ollama's `think: false`); tool calls as <tool_call> JSON; tool results grouped in a user turn
QWEN3 = """{{- $lastUser := -1 }}
{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}{{ end }}
{{- $first := "" }}{{ if .Messages }}{{ if eq (index .Messages 0).Role "system" }}{{ $first = (index .Messages 0).Content }}{{ end }}{{ end }}
{{- if .Tools }}<|im_start|>system
{{ if $first }}{{ $first }}

{{ end }}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{{ . }}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{{ else if $first }}<|im_start|>system
{{ $first }}<|im_end|>
{{ end }}
{{- $inTool := false }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if and $inTool (ne $m.Role "tool") }}<|im_end|>
{{ $inTool = false }}{{ end }}
{{- if eq $m.Role "user" }}<|im_start|>user
{{ $m.Content }}<|im_end|>
{{ else if and (eq $m.Role "system") $i }}<|im_start|>system
{{ $m.Content }}<|im_end|>
{{ else if eq $m.Role "assistant" }}<|im_start|>assistant
{{ if and (gt $i $lastUser) (or $last $m.Thinking) }}<think>
{{ $m.Thinking }}
</think>

{{ end }}{{ $m.Content }}
{{- range $j, $call := $m.ToolCalls }}{{ if or $j $m.Content }}
{{ end }}<tool_call>
{"name": "{{ $call.Function.Name }}", "arguments": {{ $call.Function.Arguments }}}
</tool_call>{{ end }}<|im_end|>
{{ else if eq $m.Role "tool" }}{{ if not $inTool }}<|im_start|>user{{ $inTool = true }}{{ end }}
<tool_response>
{{ $m.Content }}
</tool_response>
{{- end }}
{{- end }}
{{- if $inTool }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ if and .IsThinkSet (not .Think) }}<think>

</think>

{{ end }}"""

FAMILIES = {"chatml": CHATML, "qwen3": QWEN3}


# ----------------------------------------------------------------------------------------------
# ollama's side: the values its chat handler gives the template
# ----------------------------------------------------------------------------------------------
class GoJSON:
    """A value ollama prints as compact JSON (its api types' String(): encoding/json.Marshal)."""

    def __init__(self, value, **fields):
        self.value = value
        self.__dict__.update(fields)

    def __str__(self) -> str:
        return json.dumps(self.value, ensure_ascii=False, separators=(",", ":"))


@dataclass
class Message:
    Role: str
    Content: str = ""
    Thinking: str = ""
    ToolCalls: list = field(default_factory=list)


def _tool_call(call: dict):
    fn = call.get("function", call)
    args = fn.get("arguments")
    args = json.loads(args) if isinstance(args, str) else args
    return GoJSON(call, Function=GoJSON(fn, Name=fn["name"], Arguments=GoJSON(args)))


def ollama_values(messages: list[dict], system: str | None, tools: list | None = None, think: bool | None = None) -> dict:
    """What ollama's chat handler passes a TEMPLATE: the Modelfile's SYSTEM first when the chat has no
    system message; messages collated (consecutive same-role messages joined by a blank line, tool
    messages kept apart); .System = every system message joined; .Think / .IsThinkSet from `think`."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + list(messages)
    collated: list[Message] = []
    for m in messages:
        msg = Message(Role=m["role"], Content=m.get("content") or "", Thinking=m.get("reasoning_content") or "",
                      ToolCalls=[_tool_call(c) for c in m.get("tool_calls") or []])  # fmt: skip
        if collated and collated[-1].Role == msg.Role and msg.Role != "tool":
            collated[-1].Content += "\n\n" + msg.Content
        else:
            collated.append(msg)
    return {"System": "\n\n".join(m.Content for m in collated if m.Role == "system"), "Messages": collated,
            "Tools": [GoJSON(t) for t in tools or []], "Response": "", "Think": bool(think),
            "IsThinkSet": think is not None}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Probes: the model's template vs each family's TEMPLATE
# ----------------------------------------------------------------------------------------------
SYSTEM = "You are a DevOps assistant. Answer briefly."
TURNS = [("user", "How do I list pods in all namespaces?"), ("assistant", "kubectl get pods -A"),
         ("user", "如何查看某个 pod 的日志?"), ("assistant", "kubectl logs <pod> -n <namespace>"),
         ("user", "And follow them live?")]  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "run_shell", "description": "Run a shell command",
          "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}}]
TOOL_CHAT = [{"role": "user", "content": "Is nginx running?"},
             {"role": "assistant", "content": "", "reasoning_content": "I should check the service.",
              "tool_calls": [{"type": "function", "function": {"name": "run_shell",
                                                               "arguments": {"cmd": "systemctl is-active nginx"}}}]},
             {"role": "tool", "content": "active"}]  # fmt: skip


def three_turns(system: bool = True) -> list[dict]:
    return ([{"role": "system", "content": SYSTEM}] if system else []) + [{"role": r, "content": c} for r, c in TURNS]


def _hf(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def _json_normal(text: str) -> str:
    """Every JSON object on a line of its own, or inside <tool_call>, re-serialised canonically: ollama
    marshals tools and arguments compactly, Jinja's tojson with spaces."""
    def canon(m):
        try:
            return json.dumps(json.loads(m.group(0)), sort_keys=True, ensure_ascii=False)
        except ValueError:
            return m.group(0)

    return re.sub(r"(?m)^\{.*\}$", canon, text)


@dataclass
class Choice:
    family: str
    template: str
    system: str | None
    checks: dict  # probe name -> {"equal": bool, ...}


def default_system(tokenizer) -> str | None:
    """The system prompt the chat template puts first when a chat has none (ChatML's 'You are a helpful
    assistant.'), or None."""
    text = _hf(tokenizer, [{"role": "user", "content": "hi"}])
    m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\nhi", text, re.S)
    return m.group(1) if m else None


def choose(tokenizer) -> Choice:
    """The family TEMPLATE that renders what the model's chat template renders: on every probe if one
    does, else on the plain-chat probes (the others are then recorded as not carried, with a warning)."""
    if not isinstance(tokenizer.chat_template, str):
        raise DevopsError("the model has no chat template, so ollama would not know how to prompt it", "--ollama",
                          "export without --ollama, or give the tokenizer a chat_template")  # fmt: skip
    system = default_system(tokenizer)
    candidates = []
    for family, template in FAMILIES.items():
        checks = probe(tokenizer, template, system)
        if all(checks[name]["equal"] for name in REQUIRED):
            candidates.append(Choice(family, template, system, checks))
    if not candidates:
        raise DevopsError(f"the model's chat template renders like none of the ollama TEMPLATEs devops-model writes "
                          f"({', '.join(FAMILIES)})", "--ollama",
                          "export without --ollama and write the Modelfile's TEMPLATE by hand (docs/export.md)")  # fmt: skip
    return max(candidates, key=lambda c: sum(bool(x["equal"]) for x in c.checks.values()))


def not_carried(choice: Choice) -> list[str]:
    """The probes the chosen TEMPLATE does not render as the model's template does."""
    return [name for name, c in choice.checks.items() if c["equal"] is False]


REQUIRED = ("3 turns with a system prompt", "3 turns, no system prompt")


def probe(tokenizer, template: str, system: str | None) -> dict:
    """{probe: {"equal": bool, "hf": text, "ollama": text}} for each probe conversation."""
    cases = {
        "3 turns with a system prompt": (three_turns(True), {}, {}),
        "3 turns, no system prompt": (three_turns(False), {}, {}),
        "thinking off": (three_turns(True), {"enable_thinking": False}, {"think": False}),
        "tools, a call and its result": (TOOL_CHAT, {"tools": TOOLS}, {"tools": TOOLS}),
    }
    out = {}
    for name, (messages, hf_kwargs, ollama_kwargs) in cases.items():
        try:
            want = _hf(tokenizer, messages, **hf_kwargs)
        except Exception as e:  # a template that cannot take tools / flags: that probe does not apply
            out[name] = {"equal": None, "hf_error": str(e)[:200]}
            continue
        try:
            got = render(template, ollama_values(messages, system, **ollama_kwargs))
        except TemplateError as e:
            out[name] = {"equal": False, "ollama_error": str(e)}
            continue
        equal = got == want or (name.startswith("tools") and _json_normal(got) == _json_normal(want))
        out[name] = {"equal": equal, "exact": got == want, "hf": want, "ollama": got}
    if "thinking off" in out and out["thinking off"].get("hf") == out["3 turns with a system prompt"].get("hf"):
        out["thinking off"]["applies"] = False  # the template has no thinking switch
    if "tools, a call and its result" in out and "run_shell" not in (out["tools, a call and its result"].get("hf") or ""):
        out["tools, a call and its result"]["applies"] = False  # the template drops tools
    return out


def stops(tokenizer) -> list[str]:
    """Every end-of-turn token the model has: <|im_end|>, <|endoftext|>, its eos."""
    vocab = tokenizer.get_vocab()
    found = [t for t in ("<|im_end|>", "<|endoftext|>") if t in vocab]
    if tokenizer.eos_token and tokenizer.eos_token not in found:
        found.append(tokenizer.eos_token)
    return found


def text(choice: Choice, tokenizer, generation: dict, gguf_name: str = "model.gguf") -> str:
    """The Modelfile."""
    lines = [f"# written by devops-model export; TEMPLATE: the {choice.family} family, checked against the",
             "# model's own chat template (gguf.json: checks.modelfile)", f"FROM ./{gguf_name}", "",
             f'TEMPLATE """{choice.template}"""', ""]  # fmt: skip
    if '"""' in choice.template:
        raise DevopsError('the TEMPLATE holds """, which a Modelfile cannot quote')
    if choice.system:
        lines += [f'SYSTEM """{choice.system}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops(tokenizer)]
    for key, value in parameters(generation).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def parameters(generation: dict) -> dict:
    """generation_config.json as ollama PARAMETERs (greedy when it does not sample)."""
    out = {}
    if generation.get("do_sample") is False:
        out["temperature"] = 0
    else:
        for hf, ollama in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            if generation.get(hf) is not None:
                out[ollama] = generation[hf]
    if generation.get("repetition_penalty") not in (None, 1.0):
        out["repeat_penalty"] = generation["repetition_penalty"]
    return out
