"""Prompts of a chat: messages rendered through the tokenizer's chat template, each message's content
encoded with special tokens split (a literal `<|im_end|>` in a pasted log stays text, as Qwen v1's
`model.chat` does it), the tokens generation stops on, and the model's context length. Used by the
terminal chat (session.py) and the server (serve/)."""

from __future__ import annotations

from devops_cli import tools as tool_rules
from devops_cli.errors import DevopsError, first_line


def stop_ids(model, tok) -> list[int]:
    """The generation config's eos ids, the tokenizer's eos, and the ChatML markers the template uses."""
    ids = set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    ids.update(_as_list(tok.eos_token_id))
    for special in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"):
        if special in (tok.chat_template or "") or special == tok.eos_token:
            token_id = tok.convert_tokens_to_ids(special)
            if isinstance(token_id, int) and token_id != tok.unk_token_id:
                ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def context_length(config) -> int:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "seq_length", None) or 2048


class PromptEncoder:
    """Messages -> (prompt text, ids) through a tokenizer's chat template."""

    def __init__(self, tokenizer, model_name: str):
        self.tokenizer, self.model_name = tokenizer, model_name
        # text -> ids of the template pieces and message contents of the last prompt, so that a turn
        # tokenizes only the new message (history, system prompt and template text are looked up)
        self._ids_cache: dict = {}
        self._skeletons: dict = {}  # (template, roles) -> skeleton

    def remember(self, content: str) -> None:
        """Tokenize a message's content now (a reply, while the user reads) for the next prompt."""
        self._ids_cache[(True, content)] = self.tokenizer(content, add_special_tokens=False,
                                                          split_special_tokens=True).input_ids

    def encode(self, messages: list[dict], tools: list[dict] | None = None, **template_kwargs) -> tuple[str, list[int]]:
        """Rendered prompt text and its ids: template text encoded normally, message content with
        special tokens split (Qwen v1 encodes role, newline and content separately the same way).

        The template is rendered once per sequence of roles, with each content replaced by a mark;
        the text between marks and every content but the last (the new message) are tokenized once
        and then looked up, so a turn costs the tokenization of the new message only. The ids are
        the same as tokenizing every piece afresh. `template_kwargs` go to the template (Qwen3's
        enable_thinking). A conversation with tools or tool calls is rendered whole through tools.prepare
        (the model's template, or Qwen2.5's tool template for ChatML) and tokenized as one text."""
        tok = self.tokenizer
        if "</think>" in (tok.chat_template or ""):
            messages = [think_split(m) for m in messages]
        if tool_rules.uses_tools(messages, tools):
            messages, kwargs = tool_rules.prepare(tok, messages, tools)
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs,
                                               **template_kwargs)
            except Exception as e:  # jinja errors of a model's own template
                raise DevopsError(f"the chat template of '{self.model_name}' failed: {first_line(e)}") from None
            return text, tok(text, add_special_tokens=False).input_ids
        key = (tok.chat_template, tuple(m["role"] for m in messages),
               tuple(sorted(template_kwargs.items())), tuple(m.get("reasoning_content") or "" for m in messages))
        skeleton = self._skeletons.get(key)
        if skeleton is None:
            marks = [f"\x00{i}\x00" for i in range(len(messages))]
            masked = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
            try:
                rendered = tok.apply_chat_template(masked, tokenize=False, add_generation_prompt=True,
                                                   **template_kwargs)
                if not all(rendered.count(mark) == 1 for mark in marks):  # the template transforms content
                    rendered = False
                else:
                    parts = []
                    for mark in marks:
                        before, rendered = rendered.split(mark, 1)
                        parts.append(before)
                    rendered = (tuple(parts), rendered)
            except Exception as e:  # jinja errors of a model's own template
                raise DevopsError(
                    f"the chat template of '{self.model_name}' failed: {first_line(e)}") from None
            if len(self._skeletons) > 64:
                self._skeletons.clear()
            skeleton = self._skeletons[key] = rendered
        if skeleton is False or ("<tool_response>" in (tok.chat_template or "")
                                 and any("<tool_response>" in (m["content"] or "") for m in messages)):
            # the template transforms contents, or reads them (Qwen3 tells tool results from questions)
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                               **template_kwargs)
            except Exception as e:
                raise DevopsError(
                    f"the chat template of '{self.model_name}' failed: {first_line(e)}") from None
            return text, tok(text, add_special_tokens=False).input_ids
        befores, rest = skeleton
        old, cache = self._ids_cache, {}

        def lookup(text: str, content: bool, new: bool = False) -> list[int]:
            key = (content, text)
            ids = None if new else old.get(key)
            if ids is None:
                ids = (tok(text, add_special_tokens=False, split_special_tokens=True) if content else
                       tok(text, add_special_tokens=False)).input_ids
            cache[key] = ids
            return ids

        ids: list[int] = []
        pieces: list[str] = []
        last = len(messages) - 1
        for i, (before, message) in enumerate(zip(befores, messages, strict=True)):
            content = message["content"]
            pieces += [before, content]
            if before:
                ids += lookup(before, False)
            if content:
                ids += lookup(content, True, new=i == last)
        if rest:
            ids += lookup(rest, False)
        self._ids_cache = cache  # only what this prompt used: the cache never outgrows one prompt
        return "".join(pieces) + rest, ids


def think_split(message: dict) -> dict:
    """An assistant message whose content holds its reasoning (`<think>…</think>answer`) as a thinking
    template reads it (Qwen3's own split): reasoning_content and content apart, so that contents are
    rendered as written and can be encoded apart from the template text."""
    content = message.get("content")
    if message.get("role") != "assistant" or not isinstance(content, str) or "</think>" not in content \
            or message.get("reasoning_content") is not None:
        return message
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return {**message, "reasoning_content": reasoning, "content": content.split("</think>")[-1].lstrip("\n")}


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
