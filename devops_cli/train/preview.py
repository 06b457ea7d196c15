"""`sft` / `dpo --dry-run`: the first record of each dataset as the model will see it — rendered by the
recipe's chat template, tokenized and truncated as training does (data.py, render.py) — with the
trained spans marked: highlighted on a terminal, between ⟦ and ⟧ otherwise; `--json` gives the same
as data (rendered text, trained character spans, trained token spans, token ids)."""

from __future__ import annotations

from pathlib import Path

from devops_cli.errors import DevopsError
from devops_cli.sources import is_qwen_v1, local_config
from devops_cli.train.recipe import Recipe

OPEN, CLOSE = "⟦", "⟧"  # plain-text markers around trained spans (not a TTY)


def tokenizer_here(name: str) -> str | None:
    """None when the tokenizer can be read on this machine without a download or a conversion, else why not."""
    path = Path(name).expanduser()
    if path.is_dir():
        if is_qwen_v1(local_config(path)):
            return f"'{name}' is a Qwen v1 checkpoint, converted at launch"
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str):
            return None
    except Exception:  # not a repo id
        pass
    return f"the tokenizer of '{name}' is not on this machine"


def first_record(entry) -> dict | None:
    """The first record of a dataset's local files (None for a hub dataset: nothing is downloaded here)."""
    from devops_cli.train import data

    if not entry.files:
        return None
    return next(iter(data.load_raw(entry, None, streaming=True)), None)


def examples(r: Recipe) -> tuple[list[dict], list[str]]:
    """([one dict per training example made from each dataset's first record], [notes])."""
    from devops_cli import dataset_info, modeling
    from devops_cli.train import data

    why = tokenizer_here(r.model_name_or_path)
    if why:
        return [], [f"first examples not shown: {why}"]
    tok = modeling.load_tokenizer(r.model_name_or_path, r.template, r.trust_remote_code)
    chat = data.make_renderer(tok, r)
    notes = []
    if "enable_thinking" in r.origin and not chat.thinking:
        notes.append(f"enable_thinking has no effect: the chat template ({r.template}) of {r.model_name_or_path} "
                     "has no thinking switch")
    out: list[dict] = []
    for name in r.datasets:
        entry = dataset_info.resolve(name, r.dataset_dir, r.stage, r.where("dataset"))
        record = first_record(entry)
        if record is None:
            notes.append(f"{name}: no example shown (a hub dataset, or no record)")
            continue
        batch = {k: [v] for k, v in record.items()}
        try:
            if entry.ranking:
                pref = data.to_preferences(entry)(batch, [0])
                found = _preference(chat, r, {k: v[0] for k, v in pref.items()})
            else:
                standard = data.to_messages(entry)(batch, [0])
                found = [("sft", *e) for e in data.encode_examples(chat, standard["messages"][0], r.max_source_length,
                                                                   r.max_target_length, standard["tools"][0])]
        except ValueError as e:
            notes.append(f"{name}: the first record is not used ({e})")
            continue
        for n, (kind, ids, labels, truncated) in enumerate(found):
            out.append(_describe(tok, name, kind, n, len(found), ids, labels, truncated))
    return out, notes


def _preference(chat, r: Recipe, pref: dict) -> list[tuple]:
    """prompt + each answer of a preference record, the answer marked as the part scored."""
    from devops_cli.train import data

    found = []
    for kind in ("completion",) if "completion" in pref else ("chosen", "rejected"):
        encoded = data.encode_answer(chat, pref["messages"], pref[kind], r.max_source_length, r.max_target_length)
        if encoded is None:
            raise ValueError(f"its {kind} answer is empty or does not fit")
        prompt, answer, truncated = encoded
        found.append((kind, prompt + answer, [data.IGNORE] * len(prompt) + answer, truncated))
    return found


def _describe(tok, dataset: str, kind: str, n: int, of: int, ids: list[int], labels: list[int], truncated: bool) -> dict:
    from devops_cli.train.render import spans

    text, chars, tokens = spans(tok, ids, labels)
    return {"dataset": dataset, "record": 0, "example": n, "examples_of_record": of, "kind": kind, "text": text,
            "trained_chars": chars, "trained_tokens": tokens, "tokens": len(ids),
            "trained": sum(b - a for a, b in tokens), "truncated": truncated, "input_ids": ids}


def show(console, items: list[dict], notes: list[str]) -> None:
    """Each example's text with its trained spans highlighted (a terminal) or between ⟦ ⟧ (otherwise)."""
    from rich.text import Text

    from devops_cli.console import warn

    tty = console.is_terminal
    for item in items:
        what = {"sft": "trained", "completion": "scored (completion)"}.get(item["kind"], f"scored ({item['kind']})")
        head = f"# example {item['example'] + 1}/{item['examples_of_record']} of dataset {item['dataset']}'s first record"
        if item["examples_of_record"] > 1 and item["kind"] == "sft":
            head += " (the chat template re-renders earlier turns: one example per assistant turn)"
        head += f": {item['trained']}/{item['tokens']} tokens {what}"
        head += ", truncated" if item["truncated"] else ""
        head += "; highlighted" if tty else f"; between {OPEN} {CLOSE}"
        console.print(head, markup=False, soft_wrap=True)
        text, body, at = item["text"], Text(), 0
        for a, b in item["trained_chars"]:
            body.append(text[at:a], style="dim" if tty else None)
            body.append(text[a:b] if tty else f"{OPEN}{text[a:b]}{CLOSE}", style="bold green" if tty else None)
            at = b
        body.append(text[at:], style="dim" if tty else None)
        console.print(body, soft_wrap=True)
    for note in notes:
        warn(note)


def safe_examples(r: Recipe) -> tuple[list[dict], list[str]]:
    """examples(), with a problem that stops it (a tokenizer that does not load, a template that cannot
    render) as a note: a dry run reports, it does not fail on what the launch would stop on anyway."""
    try:
        return examples(r)
    except DevopsError as e:
        return [], [f"first examples not shown: {e.line()}"]
