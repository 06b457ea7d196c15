"""Datasets -> token blocks (pt), masked conversations (sft) or tokenized preferences (dpo).

pt:  every document + EOS, concatenated, cut into max_source_length blocks; the tail that does not
     fill a block is dropped (and reported). No padding, so every token of a block is trained.
sft: each example becomes a conversation (system, user, assistant, user, assistant, ...), rendered
     through the tokenizer's chat template one segment at a time: system/user segments are labelled
     -100, every assistant answer (history included) and its end-of-turn token are trained.
     Truncation keeps answers: a prompt longer than max_source_length loses the end of its user text
     (the template around it stays), an answer is cut to max_target_length, and later turns that no
     longer fit in max_source_length + max_target_length are dropped.
dpo: each preference record becomes its prompt (every turn before the rated answer, rendered and
     truncated as sft renders them) and its answers (chosen + rejected, or one completion with a KTO
     label), each ending with its end-of-turn token: the columns TRL's collators take.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from devops_cli import dataset_info
from devops_cli.errors import DevopsError, first_line
from devops_cli.train import mix
from devops_cli.train.recipe import Recipe
from devops_cli.train.render import IGNORE, Renderer, encode, encode_turns, with_reasoning

PACK_BATCH = 10_000  # pt: documents per packing batch (streaming packs fewer at a time: train/stream.py)


@dataclass
class DataReport:
    examples: int = 0  # pt: documents; sft: training examples (sequences); dpo: preference records
    conversations: int = 0  # sft: conversations read (examples > conversations: one example per turn)
    tokens: int = 0  # pt: tokens of all documents (+EOS); sft: tokens of all kept examples
    trained_tokens: int = 0  # tokens with a label
    blocks: int = 0  # pt
    dropped_tokens: int = 0  # pt: tail that did not fill a block
    dropped_examples: int = 0  # sft: examples with no trained token left
    truncated_examples: int = 0  # sft
    mix: dict = field(default_factory=dict)  # several datasets: {name: {"tokens", "share"}} (train/mix.py)

    def lines(self, stage: str) -> str:
        if self.examples == 0 and self.tokens == 0:  # streaming: nothing is read before training
            return f"{stage} data: streamed (packed on the fly; counted in metrics.json as it is read)"
        return self._lines(stage) + (f"\n{stage} data {mix.line(self.mix)}" if self.mix else "")

    def _lines(self, stage: str) -> str:
        if stage == "dpo":
            return (f"dpo data: {self.examples} preference examples kept, {self.trained_tokens}/{self.tokens} tokens "
                    f"scored; {self.truncated_examples} truncated, {self.dropped_examples} dropped")
        if stage == "pt":
            return (f"pt data: {self.examples} documents, {self.tokens} tokens -> {self.blocks} blocks; "
                    f"{self.dropped_tokens} tail tokens dropped")
        kept = f"{self.examples} conversations kept" if self.examples + self.dropped_examples == self.conversations \
            else f"{self.conversations} conversations -> {self.examples} examples kept (one per assistant turn where " \
                 "the chat template re-renders earlier turns)"
        return (f"sft data: {kept}, {self.trained_tokens}/{self.tokens} tokens trained; {self.truncated_examples} "
                f"truncated, {self.dropped_examples} dropped (no answer token)")


# ----------------------------------------------------------------------------------------------
# Loading and standardising
# ----------------------------------------------------------------------------------------------
def load_raw(entry: dataset_info.DatasetEntry, max_samples: int | None, streaming: bool = False):
    import datasets

    from devops_cli.train import rows

    try:
        if entry.files and entry.loader != "parquet":  # columns fixed by the entry, read by the one reading rule
            ds = rows.load(entry, streaming)
        elif entry.files:
            ds = datasets.load_dataset(entry.loader, data_files=[str(f) for f in entry.files], split="train",
                                       streaming=streaming)
        else:
            ds = datasets.load_dataset(entry.hub_id, entry.subset, split=entry.split, streaming=streaming)
    except Exception as e:  # datasets raises many types for unreadable files, and wraps ours
        if isinstance(cause := rows.cause(e), DevopsError):
            raise cause from None
        raise DevopsError(f"cannot load dataset '{entry.name}': {first_line(cause)}", entry.where) from None
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def _to_text(entry):
    col = entry.columns["prompt"]

    def fn(batch):
        return {"text": [t if isinstance(t, str) else "" for t in batch[col]]}

    return fn


def messages_features():
    """The features of to_messages' output: every source, alpaca or sharegpt, as role/content/tool_calls turns
    and the record's tools (JSON strings, "" for none)."""
    from datasets import Features, Value

    try:
        from datasets import List
    except ImportError:  # datasets < 4
        from datasets import Sequence as List
    return Features({"messages": List({"role": Value("string"), "content": Value("string"), "tool_calls": Value("string")}),
                     "tools": Value("string")})


def to_messages(entry):
    """Map an alpaca (prompt/query/response/history) or sharegpt (messages) record to {messages, tools}:
    messages [{role, content, tool_calls}] (tool_calls: the JSON of [{name, arguments}], "" for none; role
    "tool" for tool results), tools the JSON of the record's OpenAI tools ("" for none). JSON strings keep
    the dataset's columns one type whatever the tools' schemas (tools.py reads them back)."""
    from devops_cli import tools as tool_rules

    c, tags = entry.columns, entry.tags
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
             tags["function_tag"]: "assistant", tags["observation_tag"]: "tool", "tool": "tool", "function": "tool"}

    def message(role: str, content: str, calls: str = "") -> dict:
        return {"role": role, "content": content, "tool_calls": calls}

    def one(record: dict, index: int) -> list[dict]:
        if entry.formatting == "sharegpt":
            messages = []
            for m in record.get(c["messages"]) or []:
                tag = m.get(tags["role_tag"])
                role = roles.get(tag)
                if role is None:
                    raise DevopsError(f"record {index}: unknown role {tag!r}", entry.where,
                                      'set "tags" in dataset_info.json (role_tag, user_tag, assistant_tag)')
                content = m.get(tags["content_tag"]) or ""
                calls = ""
                if tag == tags["function_tag"]:  # LLaMA-Factory: the turn's content is the call(s)
                    calls, content = json.dumps(tool_rules.data_calls(content), ensure_ascii=False), ""
                elif role == "assistant" and (m.get("tool_calls") or m.get("function_call")):  # OpenAI's forms
                    calls = json.dumps(tool_rules.data_calls(m.get("tool_calls") or m["function_call"]), ensure_ascii=False)
                if role == "assistant":  # OpenAI/vLLM-style reasoning: a think block, as Qwen3 renders it
                    content = with_reasoning(m.get("reasoning_content") or m.get("reasoning"), content)
                messages.append(message(role, content, calls))
            system = record.get(c["system"]) if c.get("system") in record else None
            if system and not (messages and messages[0]["role"] == "system"):
                messages.insert(0, message("system", system))
            return messages
        system = record.get(c["system"]) if c["system"] in record else None
        messages = [message("system", system)] if system else []
        for q, a in record.get(c["history"]) or []:
            messages += [message("user", q or ""), message("assistant", a or "")]
        prompt = record.get(c["prompt"]) or ""
        query = record.get(c["query"]) or ""
        user = f"{prompt}\n{query}" if prompt and query else prompt or query
        return messages + [message("user", user), message("assistant", record.get(c["response"]) or "")]

    def tools_of(record: dict) -> str:
        found = tool_rules.normalize_tools(record.get(c["tools"])) if c.get("tools") in record else []
        return json.dumps(found, ensure_ascii=False) if found else ""

    def fn(batch, indices):
        keys = list(batch)
        rows = [dict(zip(keys, values)) for values in zip(*batch.values())]
        return {"messages": [one(r, i) for r, i in zip(rows, indices)],
                "tools": [tools_of(r) if entry.formatting == "sharegpt" else "" for r in rows]}

    return fn


def to_preferences(entry):
    """Map a ranking record to {messages (the prompt turns), chosen, rejected} (pairs) or
    {messages, completion, label} (KTO): answers as plain strings."""
    c, tags = entry.columns, entry.tags
    messages_of = to_messages(entry)

    def answer(value) -> str:
        if isinstance(value, list):
            value = value[0] if value else {}
        return (value.get(tags["content_tag"]) if isinstance(value, dict) else value) or ""

    def fn(batch, indices):
        keys = list(batch)
        rows = [dict(zip(keys, values)) for values in zip(*batch.values())]
        if entry.kto:
            convs = messages_of({c["messages"]: [r[c["messages"]] for r in rows]}, indices)["messages"]
            return {"messages": [m[:-1] for m in convs], "completion": [m[-1]["content"] for m in convs],
                    "label": [bool(r[c["kto_tag"]]) for r in rows]}
        if entry.formatting == "sharegpt":
            convs = messages_of({c["messages"]: [r[c["messages"]] for r in rows]}, indices)["messages"]
        else:  # alpaca: the answer column is not there; to_messages leaves an empty assistant turn to drop
            convs = [m[:-1] for m in messages_of({k: [r.get(k) for r in rows] for k in keys}, indices)["messages"]]
        return {"messages": convs, "chosen": [answer(r[c["chosen"]]) for r in rows],
                "rejected": [answer(r[c["rejected"]]) for r in rows]}

    return fn


def load_all(recipe: Recipe, num_proc: int | None):
    """Every dataset of the recipe, standardised to {text} (pt), {messages} (sft) or preferences (dpo:
    to_preferences), concatenated or interleaved (mix_strategy, train/mix.py)."""
    parts = []
    for name in recipe.datasets:
        entry = dataset_info.resolve(name, recipe.dataset_dir, recipe.stage, recipe.where("dataset"))
        ds = load_raw(entry, recipe.max_samples)
        if recipe.stage == "pt":
            fn, kwargs = _to_text(entry), {}
        elif entry.ranking:
            fn, kwargs = to_preferences(entry), {"with_indices": True}
        else:  # the column type stated: a sharegpt column's own message fields must not carry over
            fn, kwargs = to_messages(entry), {"with_indices": True, "features": messages_features()}
        parts.append(ds.map(fn, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                            desc=f"reading {name}", **kwargs))
    return mix.combine(parts, recipe.datasets, recipe.mix_strategy, recipe.interleave_probs, recipe.seed,
                       recipe.where("interleave_probs"))


# ----------------------------------------------------------------------------------------------
# pt: pack documents into blocks
# ----------------------------------------------------------------------------------------------
def pack(raw, tokenizer, block_size: int, num_proc: int | None = None, names: list[str] | None = None):
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DevopsError(f"tokenizer {tokenizer.name_or_path} has no eos_token", hint="set eos_token in tokenizer_config.json")

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids], "length": [len(x) + 1 for x in ids]}

    def group(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // block_size * block_size
        blocks = [flat[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=["text"], num_proc=num_proc, desc="tokenizing")
    # large map batches: the only tokens lost are the tail of each 10k-document batch
    mixed = mix.SOURCE in tokenized.column_names
    blocks = tokenized.map(group, batched=True, batch_size=PACK_BATCH, num_proc=num_proc, desc="packing",
                           remove_columns=["length", mix.SOURCE] if mixed else ["length"])
    report = DataReport(examples=len(raw), tokens=sum(tokenized["length"]), blocks=len(blocks))
    if mixed:
        mix.count(report.mix, names, tokenized[mix.SOURCE], tokenized["length"])
    report.trained_tokens = report.blocks * block_size
    report.dropped_tokens = report.tokens - report.trained_tokens
    if report.blocks == 0:
        raise DevopsError(f"the pt corpus has {report.tokens} tokens in {report.examples} documents, fewer than "
                          f"one block of max_source_length={block_size}", hint="add text or lower max_source_length")
    return blocks, report


# ----------------------------------------------------------------------------------------------
# sft / dpo: conversations rendered and masked by train/render.py
# ----------------------------------------------------------------------------------------------
def make_renderer(tokenizer, recipe: Recipe) -> Renderer:
    return Renderer(tokenizer, recipe.template, recipe.system_prompt, recipe.enable_thinking)


def encode_examples(renderer: Renderer, messages: list[dict], max_source: int, max_target: int, tools=None):
    """-> [(input_ids, labels, truncated)]: one sequence for a conversation the template renders as
    growing prefixes, else one per assistant turn (render.py); `tools` as to_messages gives them."""
    return [encode(renderer.tok, turns, max_source, max_target) for turns in renderer.examples(messages, tools)]


def encode_sft(renderer: Renderer, messages: list[dict], max_source: int, max_target: int):
    """-> (input_ids, labels, truncated) of a conversation that is one sequence (a prefix-stable
    template); ValueError for one the template splits into several examples (use encode_examples)."""
    examples = encode_examples(renderer, messages, max_source, max_target)
    if len(examples) > 1:
        raise ValueError(f"the template renders this conversation as {len(examples)} examples")
    return examples[0] if examples else ([], [], False)


def encode_answer(renderer: Renderer, messages: list[dict], answer: str, max_source: int, max_target: int):
    """The prompt (every turn of `messages` as the template renders it before `answer`, earlier answers
    as context) and `answer` to it, rendered and truncated as sft does: -> (prompt_ids, answer_ids,
    truncated), or None when the last turn does not fit or the answer is empty."""
    turns = renderer.last_turn(messages + [{"role": "assistant", "content": answer}])
    encoded, truncated = encode_turns(renderer.tok, turns, max_source, max_target)
    if len(encoded) != len(turns) or not encoded[-1][2]:
        return None
    context = [t for prompt, reply, _ in encoded[:-1] for t in prompt + reply] + encoded[-1][0]
    return context, encoded[-1][1], truncated


def _encode_and_keep(raw, fn, num_proc):
    """Maps `fn` (which adds 'valid' and 'truncated' columns) over raw, keeps the valid rows and counts
    the dropped and truncated ones."""
    encoded = raw.map(fn, batched=True, remove_columns=raw.column_names, num_proc=num_proc, desc="tokenizing")
    valid, truncated = encoded["valid"], encoded["truncated"]
    kept = encoded.filter(lambda v: v, input_columns="valid").remove_columns(["valid", "truncated"])
    return kept, DataReport(examples=len(kept), dropped_examples=len(valid) - sum(valid),
                            truncated_examples=sum(t for t, v in zip(truncated, valid) if v))


def build_sft(raw, tokenizer, recipe: Recipe, num_proc: int | None = None):
    """Conversations -> {input_ids, labels}: one row per conversation, or one per assistant turn where the
    template re-renders earlier turns (render.py)."""
    chat = make_renderer(tokenizer, recipe)

    def fn(batch):
        out = {"input_ids": [], "labels": [], "truncated": [], "valid": []}
        if mix.SOURCE in batch:
            out[mix.SOURCE] = []
        for i, messages in enumerate(batch["messages"]):
            try:
                examples = encode_examples(chat, messages, recipe.max_source_length, recipe.max_target_length,
                                           batch["tools"][i] if "tools" in batch else None)
            except ValueError:
                examples = []
            for input_ids, labels, truncated in examples or [([], [], False)]:
                out["input_ids"].append(input_ids)
                out["labels"].append(labels)
                out["truncated"].append(truncated)
                out["valid"].append(any(t != IGNORE for t in labels))
                if mix.SOURCE in batch:
                    out[mix.SOURCE].append(batch[mix.SOURCE][i])
        return out

    kept, report = _encode_and_keep(raw, fn, num_proc)
    report.conversations = len(raw)
    if mix.SOURCE in kept.column_names:
        mix.count(report.mix, recipe.datasets, kept[mix.SOURCE], [len(x) for x in kept["input_ids"]])
        kept = kept.remove_columns([mix.SOURCE])
    report.tokens = sum(len(x) for x in kept["input_ids"])
    report.trained_tokens = sum(sum(1 for t in x if t != IGNORE) for x in kept["labels"])
    if report.examples == 0:
        raise DevopsError(f"no sft example has an answer token left ({report.dropped_examples} dropped)",
                          recipe.where("dataset"), "check the response column and max_target_length")
    return kept, report


def build_preferences(raw, tokenizer, recipe: Recipe, num_proc: int | None = None):
    """Preference records -> TRL's tokenized columns: {prompt_ids, chosen_ids, rejected_ids} (pairs) or
    {prompt_ids, completion_ids, label} (KTO), through the same template, masking and truncation as sft."""
    chat = make_renderer(tokenizer, recipe)
    kto = "label" in raw.column_names
    answers = ("completion",) if kto else ("chosen", "rejected")

    def fn(batch):
        out = {"prompt_ids": [], **{f"{a}_ids": [] for a in answers}, "truncated": [], "valid": []}
        if kto:
            out["label"] = list(batch["label"])
        for i, messages in enumerate(batch["messages"]):
            try:
                encoded = [encode_answer(chat, messages, batch[a][i], recipe.max_source_length,
                                         recipe.max_target_length) for a in answers]
            except ValueError:
                encoded = [None]
            ok = all(e is not None for e in encoded) and len({tuple(e[0]) for e in encoded}) == 1
            out["prompt_ids"].append(encoded[0][0] if ok else [])
            for a, e in zip(answers, encoded):
                out[f"{a}_ids"].append(e[1] if ok else [])
            out["truncated"].append(ok and any(e[2] for e in encoded))
            out["valid"].append(ok)
        return out

    kept, report = _encode_and_keep(raw, fn, num_proc)
    for a in answers:
        report.trained_tokens += sum(len(x) for x in kept[f"{a}_ids"])
    report.tokens = report.trained_tokens + len(answers) * sum(len(x) for x in kept["prompt_ids"])
    if report.examples == 0:
        raise DevopsError(f"no preference example is left ({report.dropped_examples} dropped: an empty answer, or a "
                          "prompt longer than max_source_length + max_target_length)", recipe.where("dataset"),
                          "check the chosen/rejected columns and the length limits")
    return kept, report


def build(recipe: Recipe, tokenizer, num_proc: int | None = None):
    """-> (train, eval or None, DataReport)"""
    raw = load_all(recipe, num_proc)
    if recipe.stage == "pt":
        dataset, report = pack(raw, tokenizer, recipe.max_source_length, num_proc, recipe.datasets)
    elif recipe.stage == "dpo":
        dataset, report = build_preferences(raw, tokenizer, recipe, num_proc)
    else:
        dataset, report = build_sft(raw, tokenizer, recipe, num_proc)
    if not recipe.val_size:
        return dataset, None, report
    size = int(recipe.val_size) if recipe.val_size >= 1 else recipe.val_size
    if (size if isinstance(size, int) else max(1, round(size * len(dataset)))) >= len(dataset):
        raise DevopsError(f"val_size {recipe.val_size} leaves no training data ({len(dataset)} examples)",
                          recipe.where("val_size"), "lower val_size")
    split = dataset.train_test_split(test_size=size, seed=recipe.seed)
    return split["train"], split["test"], report
