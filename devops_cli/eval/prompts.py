"""Prompt styles of the four protocols, character for character as ../shared/notes/eval-protocol.md
gives them, and the token encodings (plain, or ChatML built piece by piece as the devops-eval harness
does). No torch import here.

    devops-eval  H="以下是关于开发运维领域的单项选择题，请选出其中的正确答案。请直接输出选项。\\n"
                 k x (H + "问题：{q}\\nA. ..\\nD. ..\\n答案：{X}\\n") + H + "问题：{q}\\n...答案："
    cmmlu        "以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n" + k x ("题目：{q}\\n...答案是：{X}\\n\\n") + item
    ceval        "以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n" + k x ("{q}\\n...答案：{X}\\n\\n") + item
    lm-eval      the cmmlu_* / ceval-valid_* tasks of lm-evaluation-harness: description +
                 k x ("{q.strip()}\\n...答案：" + " " + X + "\\n\\n") + item; options scored as " A".." D"
"""

from __future__ import annotations

from devops_cli.errors import DevopsError
from devops_cli.eval.exam import LETTERS, Question, Subject
from devops_cli.templates import has_chatml_tokens

PROTOCOLS = ("devops-eval", "cmmlu", "ceval", "lm-eval")
DEVOPS_HEADER = "以下是关于开发运维领域的单项选择题，请选出其中的正确答案。请直接输出选项。\n"
DEVOPS_SYSTEM = "you are a helpful assistant"  # sic: lower case, no full stop (the devops-eval harness)
CMMLU_MAX_TOKENS = 2048  # CMMLU's own harness drops the longest exemplars above this


def header(protocol: str, subject: Subject) -> str:
    if protocol == "devops-eval":
        return DEVOPS_HEADER
    if protocol == "cmmlu" or (protocol == "lm-eval" and subject.layout == "cmmlu"):
        return f"以下是关于{subject.zh}的单项选择题，请直接给出正确答案的选项。\n\n"
    if protocol == "ceval":
        return f"以下是中国关于{subject.zh}考试的单项选择题，请选出其中的正确答案。\n\n"
    return f"以下是中国关于{subject.zh}的单项选择题，请选出其中的正确答案。\n\n"  # lm-eval's ceval-valid_*


def options(q: Question, protocol: str) -> str:
    if protocol == "devops-eval":  # the harness: `if df[opt][i]:` then '{}. {}\n'.format(opt, value)
        return "".join(f"{letter}. {value}\n" for letter, value in zip(LETTERS, q.options) if value)
    return "".join(f"{letter}. {value}\n" for letter, value in zip(LETTERS, q.options))


def item(protocol: str, q: Question) -> str:
    """One question without its answer, ending where the model's answer letter goes."""
    if protocol == "devops-eval":
        return f"问题：{q.question}\n{options(q, protocol)}答案："
    if protocol == "cmmlu":
        return f"题目：{q.question}\n{options(q, protocol)}答案是："
    if protocol == "ceval":
        return f"{q.question}\n{options(q, protocol)}答案："
    if protocol == "lm-eval":
        return f"{q.question.strip()}\n{options(q, protocol)}答案："
    raise DevopsError(f"--protocol '{protocol}' is not one of {', '.join(PROTOCOLS)}")


def exemplar(protocol: str, subject: Subject, q: Question) -> str:
    if protocol == "devops-eval":
        return f"{DEVOPS_HEADER}{item(protocol, q)}{q.answer}\n"
    if protocol == "lm-eval":
        return f"{item(protocol, q)} {q.answer}\n\n"
    return f"{item(protocol, q)}{q.answer}\n\n"


def build(protocol: str, subject: Subject, q: Question, shots: int, exemplars: list[int] | None = None) -> str:
    """The prompt text of question q with the first `shots` dev rows (or the dev rows `exemplars`)."""
    rows = [subject.dev[i] for i in (exemplars if exemplars is not None else range(shots))]
    shots_text = "".join(exemplar(protocol, subject, e) for e in rows)
    if protocol == "devops-eval":
        return shots_text + DEVOPS_HEADER + item(protocol, q)
    return header(protocol, subject) + shots_text + item(protocol, q)


def option_strings(protocol: str, chat: bool) -> list[str]:
    """What is scored: the bare letters, or lm-eval's continuations " A".." D" (bare under a chat template)."""
    return [f" {x}" for x in LETTERS] if protocol == "lm-eval" and not chat else list(LETTERS)


def split_system(protocol: str, subject: Subject, text: str, system: str | None) -> tuple[str, str]:
    """(system message, user turn) for chat models. lm-eval's --apply_chat_template makes the
    description the system message; the others send the whole prompt as one user turn."""
    if protocol == "lm-eval":
        head = header(protocol, subject)
        return (system if system is not None else head), text[len(head):]
    return (system if system is not None else DEVOPS_SYSTEM), text


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------
def add_special(protocol: str) -> bool:
    """lm-eval's HFLM encodes without special tokens; the CMMLU / C-Eval / devops-eval harnesses call
    tokenizer.encode(prompt) (Qwen tokenizers add no BOS either way)."""
    return protocol != "lm-eval"


is_chatml = has_chatml_tokens


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The chat template's own rendering, generation prompt included, with thinking off
    (`enable_thinking=False`: Qwen3's hybrid template then ends the prompt after an empty think block,
    where the answer starts; templates without the switch ignore it)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)


def thinking(tokenizer) -> str | None:
    """How the template treats thinking at the generation prompt: None (no thinking block), 'off' (a
    hybrid template, rendered with enable_thinking=False: empty think block, answer next), or 'forced'
    (the prompt opens a think block that the switch does not close: the first token read is the
    start of the reasoning, not an answer)."""
    messages = [{"role": "user", "content": "?"}]
    off = render_chat(tokenizer, messages)
    on = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    tail = off[off.rfind("?"):]
    if "<think>" in tail and "</think>" not in tail:
        return "forced"
    return "off" if on != off or "</think>" in tail else None


def encode_chat(tokenizer, system: str, user: str) -> list[int]:
    """The prompt as the model's chat template renders it, thinking off, read where the answer starts.
    When the template renders Qwen ChatML, the ChatML part is encoded as the devops-eval harness does
    (pieces encoded apart, then concatenated, up to `<|im_start|>assistant\n`), followed by whatever
    the template adds after the assistant header (Qwen3: the empty `<think>\n\n</think>\n\n`).
    Other templates: the tokenizer's own rendering, tokenized whole."""
    messages = ([{"role": "system", "content": system}] if system or is_chatml(tokenizer) else []) + \
        [{"role": "user", "content": user}]  # fmt: skip
    text = render_chat(tokenizer, messages)
    head = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if not is_chatml(tokenizer) or not text.startswith(head):
        return tokenizer.encode(text, add_special_tokens=False)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    nl = enc("\n")
    tail = tokenizer.encode(text[len(head):], add_special_tokens=False) if len(text) > len(head) else []
    return ([start] + enc("system") + nl + enc(system) + [end] + nl
            + [start] + enc("user") + nl + enc(user) + [end] + nl
            + [start] + enc("assistant") + nl + tail)  # fmt: skip


def option_ids(tokenizer, strings: list[str], name: str) -> list[int]:
    ids = []
    for s in strings:
        got = tokenizer.encode(s, add_special_tokens=False)
        if len(got) != 1:
            raise DevopsError(f"the tokenizer of '{name}' encodes the option {s!r} as {len(got)} tokens {got}",
                              hint="first-token scoring needs each option letter to be one token; try another --protocol")
        ids.append(got[0])
    return ids
