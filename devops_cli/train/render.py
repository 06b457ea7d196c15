"""Chat template -> what sft and dpo train: each assistant turn as the model's template renders it at
that point, its answer (with the end-of-turn marker) trained, everything else context.

The rule, for the assistant message at index i of a conversation:

    prompt_i = render(messages[:i], add_generation_prompt=True, enable_thinking=...)
    full_i   = render(messages[:i+1], enable_thinking=...)
    answer_i = full_i[len(prompt_i):] up to and including the end-of-turn marker   (trained)

- Prefix-stable conversations (ChatML, Qwen2: each prompt_{i+1} starts with full_i) stay one training
  sequence with every answer trained, as before.
- Otherwise (Qwen3's template drops the reasoning of earlier turns and puts a think block on the last
  one, so turn 1 renders differently once turn 2 follows) every assistant turn is an example of its own:
  prompt_i (the history as the template renders it then) + answer_i, only answer_i trained. Every turn
  is trained, each exactly as the model sees it at inference.
  Stability is decided per conversation by rendering, never by the template's name.
- enable_thinking (templates that take it, like Qwen3's): true -> an answer is trained as the last turn
  renders, with its reasoning (`<think>...</think>` in the answer, or a reasoning_content field folded
  into it by data.to_messages), or with the template's empty think block when it has none; false ->
  reasoning removed and the empty think block part of the prompt (inference with enable_thinking=False).
  Templates without the switch ignore it.
- Tool use (tools.py): the conversation's tools go to every rendering; an assistant turn that calls tools is
  an answer like any other (its <tool_call> blocks trained), tool results are prompt (a user-side turn, as
  the template writes them: <tool_response> in a user turn for Qwen), never trained. A template that renders
  no tools (ChatML) is replaced for these conversations by Qwen2.5's tool template.

Truncation, the same in both forms: a prompt segment longer than max_source_length loses the end of
its user text (the template around it stays), an answer is cut to max_target_length, and turns that no
longer fit in max_source_length + max_target_length are not trained (a later turn's own example
that does not fit is dropped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from devops_cli import tools as tool_rules
from devops_cli.errors import DevopsError
from devops_cli.templates import DEFAULT_SYSTEM, END_OF_TURN

IGNORE = -100
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_PROBE = "devops-model probe answer"


@dataclass
class Turn:
    """One user turn and its answer inside a rendered example: before + content + after is the prompt
    segment (content: the user's text, the part truncation may cut), answer the assistant's turn as
    rendered, with its end-of-turn marker."""

    before: str
    content: str
    after: str
    answer: str
    trained: bool


def split_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message, as Qwen3's template splits `<think>...</think>`."""
    if THINK_CLOSE not in content:
        return "", content
    head, _, tail = content.rpartition(THINK_CLOSE)
    return head.split(THINK_OPEN)[-1].strip("\n"), tail.lstrip("\n")


def with_reasoning(reasoning: str | None, content: str) -> str:
    """An assistant message's content with its reasoning folded in as a think block (how data keeps a
    reasoning_content field: Qwen-family templates split it out again)."""
    if not reasoning or not reasoning.strip() or THINK_CLOSE in content:
        return content
    return f"{THINK_OPEN}\n{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n{content.lstrip(chr(10))}"


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Renderer:
    """Renders conversations through the tokenizer's chat template and cuts them into Turns.

    template: 'auto' (the tokenizer's own), 'chatml' or 'default' (modeling.load_tokenizer installs
    those); system_prompt: a system message added where the data has none."""

    def __init__(self, tokenizer, template: str = "auto", system_prompt: str | None = None,
                 enable_thinking: bool = True):
        self.tok = tokenizer
        self.template = template
        self.system = system_prompt or (DEFAULT_SYSTEM if template == "chatml" else None)
        self.enable_thinking = enable_thinking
        self.thinking = self._has_thinking_switch()
        self.eot = END_OF_TURN.get(template) or self._end_of_turn()

    # --- the template --------------------------------------------------------------------------
    def render(self, messages: list[dict], generation_prompt: bool, thinking: bool | None = None,
               tools: list[dict] | None = None) -> str:
        """The template's text; a conversation with tools or tool calls goes through tools.prepare
        (the model's own template, or Qwen2.5's tool template for ChatML)."""
        kwargs = {}
        if tool_rules.uses_tools(messages, tools):
            messages, kwargs = tool_rules.prepare(self.tok, messages, tools)
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                            enable_thinking=self.enable_thinking if thinking is None else thinking,
                                            **kwargs)

    def _has_thinking_switch(self) -> bool:
        """Whether the template renders a prompt differently with enable_thinking false (Qwen3's does)."""
        probe = [{"role": "user", "content": "q"}]
        try:
            on, off = (self.tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True,
                                                    enable_thinking=flag) for flag in (True, False))
        except Exception:  # a template that cannot render a bare user turn: no switch to speak of
            return False
        return on != off

    def _end_of_turn(self) -> str:
        """The marker that closes an assistant turn in this template, read from a rendering: the
        tokenizer's eos or <|im_end|> when the answer's tail holds it, else the tail itself."""
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}]
        try:
            full = self.render(messages, False)
        except Exception:
            return self.tok.eos_token
        tail = full[full.rfind(_PROBE) + len(_PROBE):] if _PROBE in full else ""
        for marker in (self.tok.eos_token, "<|im_end|>"):
            if marker and marker in tail:
                return marker
        return tail.rstrip() or self.tok.eos_token

    # --- conversations -------------------------------------------------------------------------
    def conversation(self, messages: list[dict]) -> list[dict]:
        """system?, user, assistant, ... (tool use: an assistant message with tool_calls, then the tool
        results (role tool), then the next assistant message): the recipe's system prompt where the data
        has none, the reasoning of answers removed when the template takes enable_thinking and it is false,
        calls as [{name, arguments}] (a JSON string of them is read). Messages after the last answer have
        nothing to train and are left out. Raises ValueError for messages out of that order (data.build
        drops those records)."""
        if messages and messages[0]["role"] == "system":
            head, rest = [{"role": "system", "content": messages[0]["content"] or ""}], messages[1:]
        else:
            head, rest = ([{"role": "system", "content": self.system}] if self.system else []), messages
        out, last = [], None  # last: the role before, "call" for an assistant message with tool calls
        for m in rest:
            role, content = m["role"], m.get("content") or ""
            allowed = {"user": (None, "assistant"), "assistant": ("user", "tool"), "tool": ("call", "tool")}
            if last not in allowed.get(role, ()):
                raise ValueError("messages must alternate user, assistant (tool results after an assistant's tool "
                                 "calls) after an optional system message")
            if role == "assistant":
                if self.thinking and not self.enable_thinking:
                    content = split_reasoning(content)[1]
                calls = m.get("tool_calls") or []
                if isinstance(calls, str):
                    calls = json.loads(calls)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                out.append(message)
                last = "call" if calls else "assistant"
            else:
                out.append({"role": role, "content": content})
                last = role
        while out and out[-1]["role"] != "assistant":  # a question without an answer has nothing to train
            out.pop()
        return head + out

    def examples(self, messages: list[dict], tools=None) -> list[list[Turn]]:
        """The training examples of one conversation: [all turns] when it renders as growing prefixes,
        else one example per assistant turn (its history untrained). `tools`: the conversation's OpenAI
        tools (or their JSON), rendered where the template puts them; tool results are prompt, never trained."""
        msgs = self.conversation(messages)
        tools = tool_rules.normalize_tools(tools) or None
        answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        prompts, fulls, anchors = [], [], []
        for n, i in enumerate(answers):
            prompt, full = self.render(msgs[:i], True, tools=tools), self.render(msgs[: i + 1], False, tools=tools)
            # where an answer starts once it is history: its generation prompt without the empty think
            # block that enable_thinking false adds (that block is not part of the history's rendering)
            anchors.append(self.render(msgs[:i], True, thinking=True, tools=tools)
                           if self.thinking and not self.enable_thinking else prompt)
            if not full.startswith(prompt):
                raise DevopsError(f"the chat template of {self.tok.name_or_path} renders assistant turn {n + 1} "
                                  "differently from its generation prompt, so the answer cannot be cut out of it",
                                  hint="use template: chatml")
            prompts.append(prompt)
            fulls.append(full)
        users = [msgs[i - 1]["content"] for i in answers]
        trained = [bool(_visible(msgs[i]["content"]).strip() or msgs[i].get("tool_calls")) for i in answers]
        if all(prompts[k].startswith(fulls[k - 1]) for k in range(1, len(answers))):
            return [self._one_sequence(prompts, fulls, users, trained)] if answers else []
        return [self._turn_example(k, prompts, fulls, anchors, users, trained[k]) for k in range(len(answers))]

    def last_turn(self, messages: list[dict], tools=None) -> list[Turn]:
        """The example that trains the conversation's last answer (dpo: prompt + chosen / rejected):
        the whole sequence of a prefix-stable conversation, else that turn's own example."""
        examples = self.examples(messages, tools)
        if not examples:
            raise ValueError("no assistant answer")
        *history, last = examples[-1]
        return [Turn(t.before, t.content, t.after, t.answer, False) for t in history] + [last]

    # --- cutting renders into turns -------------------------------------------------------------
    def _cut_answer(self, rendered: str) -> tuple[str, str]:
        """(answer up to and including the end-of-turn marker, the text after it)."""
        cut = rendered.find(self.eot) if self.eot else -1
        cut = len(rendered) if cut < 0 else cut + len(self.eot)
        return rendered[:cut], rendered[cut:]

    def _one_sequence(self, prompts, fulls, users, trained) -> list[Turn]:
        turns, done, carry = [], "", ""  # carry: text between an end-of-turn and the next segment (ChatML: "\n")
        for k, prompt in enumerate(prompts):
            answer, carry_next = self._cut_answer(fulls[k][len(prompt):])
            turns.append(Turn(*_split_content(carry + prompt[len(done):], users[k]), answer, trained[k]))
            carry, done = carry_next, fulls[k]
        return turns

    def _turn_example(self, k: int, prompts, fulls, anchors, users, trained: bool) -> list[Turn]:
        """Turn k's own example: its prompt (history as rendered now) cut into the earlier turns, where
        each earlier answer starts where that turn's own generation prompt stops agreeing with this one."""
        prompt = prompts[k]
        turns, pos = [], 0
        for j in range(k):
            start = _common_prefix(anchors[j], prompt)
            end = prompt.find(self.eot, start) if self.eot else -1
            if start < pos or end < 0:  # the history does not cut into turns: one untrained block
                turns, pos = [], 0
                break
            end += len(self.eot)
            turns.append(Turn(*_split_content(prompt[pos:start], users[j]), prompt[start:end], False))
            pos = end
        answer, _ = self._cut_answer(fulls[k][len(prompt):])
        return turns + [Turn(*_split_content(prompt[pos:], users[k]), answer, trained)]


def _visible(content: str) -> str:
    """An answer's text without think markers (an answer with nothing in it is not trained)."""
    return content.replace(THINK_OPEN, "").replace(THINK_CLOSE, "")


def _split_content(segment: str, content: str) -> tuple[str, str, str]:
    """(before, content, after) of a prompt segment: the user's text located from the end, so truncation
    can shorten it and keep the template around it."""
    pos = segment.rfind(content) if content else -1
    if pos < 0:
        return segment, "", ""
    return segment[:pos], content, segment[pos + len(content):]


# ----------------------------------------------------------------------------------------------
# Turns -> token ids and labels
# ----------------------------------------------------------------------------------------------
def encode_turns(tok, turns: list[Turn], max_source: int, max_target: int):
    """-> ([(prompt_ids, answer_ids, trained)], truncated): each turn tokenized segment by segment (so
    every trained span starts and ends on a token boundary), cut by the truncation rules above."""

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"] if text else []

    out, used, truncated = [], 0, False
    budget = max_source + max_target
    for t in turns:
        pre, body, post = ids(t.before), ids(t.content), ids(t.after)
        room = max_source - len(pre) - len(post)
        if room < 0:
            truncated = True
            break
        if len(body) > room:
            body, truncated = body[:room], True
        prompt = pre + body + post
        answer = ids(t.answer)
        if len(answer) > max_target:
            answer, truncated = answer[:max_target], True
        if used and used + len(prompt) + len(answer) > budget:
            truncated = True
            break
        used += len(prompt) + len(answer)
        out.append((prompt, answer, t.trained))
    return out, truncated


def encode(tok, turns: list[Turn], max_source: int, max_target: int):
    """-> (input_ids, labels, truncated): prompts labelled IGNORE, trained answers labelled with
    themselves, untrained ones (history, empty answers) IGNORE."""
    input_ids: list[int] = []
    labels: list[int] = []
    encoded, truncated = encode_turns(tok, turns, max_source, max_target)
    for prompt, answer, trained in encoded:
        input_ids += prompt + answer
        labels += [IGNORE] * len(prompt) + (answer if trained else [IGNORE] * len(answer))
    return input_ids, labels, truncated


def spans(tok, input_ids: list[int], labels: list[int]) -> tuple[str, list[list[int]], list[list[int]]]:
    """(the text of input_ids, trained character spans [start, end), trained token spans [start, end)).
    Trained spans begin and end on segment boundaries, so decoding up to them is exact."""
    tokens: list[list[int]] = []
    for i, label in enumerate(labels):
        if label != IGNORE and (not tokens or tokens[-1][1] != i):
            tokens.append([i, i + 1])
        elif label != IGNORE:
            tokens[-1][1] = i + 1

    def text(upto: int) -> str:
        return tok.decode(input_ids[:upto], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    chars = [[len(text(a)), len(text(b))] for a, b in tokens]
    return text(len(input_ids)), chars, tokens
