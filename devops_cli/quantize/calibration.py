"""Calibration data for `devops-model quantize`: a source (--calib: the bundled DevOps corpus, a
.jsonl/.json/.txt file, or dataset names from dataset_info.json), checked before torch loads, then
cut into token blocks for GPTQ with evenly spaced blocks held out for perplexity. No torch import."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from devops_cli.errors import DevopsError

BUNDLED_CORPUS = ("devops_corpus_en", "devops_corpus_zh")
FILE_KINDS = (".jsonl", ".json", ".txt")
FIELD_HINT = 'give every record a "text" field (or messages, or instruction/output), or pass --calib-field NAME'


@dataclass
class Source:
    name: str  # for messages: a path, a dataset name, the bundled corpus
    where: str
    records: object  # () -> iterator of (text-or-record, where)
    to_text: object  # (record, where, tokenizer) -> str


@dataclass
class Blocks:
    calib: list[list[int]]
    held: list[list[int]]
    tokens_read: int


def open_source(spec: str | None, field: str | None, dataset_dir: str, where: str) -> Source:
    """--calib: None (the bundled DevOps corpus), a .jsonl/.json/.txt file, or dataset names (comma list)
    from dataset_info.json in --dataset-dir. Reads the first record so a wrong field fails here."""
    from devops_cli import dataset_info

    if spec is None or spec == "bundled":
        entries = [dataset_info.resolve(n, "bundled", "pt", where) for n in BUNDLED_CORPUS]
        return _registry_source(entries, "the bundled DevOps corpus (" + ", ".join(BUNDLED_CORPUS) + ")", where)
    path = Path(spec)
    if path.suffix in FILE_KINDS or os.path.lexists(path):
        return _file_source(path, field, where)
    _, registry = dataset_info.read_registry(dataset_dir, where)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        if n not in registry and "/" in n:
            raise DevopsError(f"calibration file '{spec}' not found", where, "check the path")
    entries = []
    for n in names:
        raw = registry.get(n)
        stage = raw.get("stage", "pt") if isinstance(raw, dict) else "pt"
        entries.append(dataset_info.resolve(n, dataset_dir, "sft" if stage == "sft" else "pt", where))
    return _registry_source(entries, f"dataset {spec}", where)


def _file_source(path: Path, field: str | None, where: str) -> Source:
    from devops_cli import reading

    reading.check_file(path, where, "calibration file")  # a dangling link, a folder, a device: one line
    if reading.split_suffix(path)[0] not in FILE_KINDS:
        raise DevopsError(f"calibration file '{path}' is not {', '.join(FILE_KINDS)}", where,
                          "convert it, or register it in dataset_info.json and pass its name")
    try:
        with reading.open_text(path, where) as f:  # the one reading rule: BOM encodings, NUL bytes, .gz
            text = f.read()
    except (UnicodeDecodeError, reading.NotText) as e:
        raise DevopsError(f"calibration file '{path}' is {reading.not_text(e, path)}", where,
                          "pass a text, .jsonl or .json file") from None
    if not text.strip():
        raise DevopsError(f"calibration file '{path}' is empty", where, "add text (jsonl: one {\"text\": ...} per line)")
    if reading.split_suffix(path)[0] == ".txt":
        return Source(str(path), str(path), lambda: iter([(text, str(path))]), lambda t, w, tok: t)
    records = _json_records(path)
    first, first_where = next(records)
    field = field or next((f for f in ("text", "messages", "instruction") if f in first), None)
    if field is None or field not in first:
        got = ", ".join(map(str, first)) or "none"
        raise DevopsError(f"no '{field or 'text'}' field in the calibration record (fields: {got})", first_where, FIELD_HINT)

    def to_text(record, w, tok):
        if field not in record:
            raise DevopsError(f"no '{field}' field in the calibration record", w, FIELD_HINT)
        if field == "messages":
            return _render(record[field], tok)
        if field == "instruction":
            turns = [("user", record.get("instruction", "") + ("\n" + record["input"] if record.get("input") else "")),
                     ("assistant", record.get("output", ""))]
            return _render([{"role": r, "content": c} for r, c in turns], tok)
        if not isinstance(record[field], str):
            raise DevopsError(f"field '{field}' is not a string", w, FIELD_HINT)
        return record[field]

    return Source(str(path), str(path), lambda: _json_records(path), to_text)


def _json_records(path: Path):
    """(record, where) of a .jsonl/.json calibration file; the first unreadable record stops with one line."""
    from devops_cli.records import json_records

    for where, record, problem in json_records(path):
        if problem:
            raise DevopsError(problem, where)
        if not isinstance(record, dict):
            raise DevopsError("a calibration record must be a JSON object", where, FIELD_HINT)
        yield record, where


def _registry_source(entries, name: str, where: str) -> Source:
    from devops_cli import records
    from devops_cli.errors import DevopsErrors
    from devops_cli.train import data

    problems = [p for e in entries for p in records.problems(e)]
    if problems:
        raise DevopsErrors(problems)

    def one(e):
        if e.files and e.loader == "json":
            for f in e.files:
                yield from ((r, w, e) for r, w in _json_records(f))
        else:  # csv, parquet, text, or a hub dataset the user named
            for i, r in enumerate(data.load_raw(e, None)):
                yield r, f"{e.where} (row {i})", e

    def records():  # round robin over the datasets: every one is in the calibration and the held-out blocks
        streams = [one(e) for e in entries]
        while streams:
            for stream in list(streams):
                item = next(stream, None)
                if item is None:
                    streams.remove(stream)
                else:
                    yield item

    def to_text(item, w, tok):
        record, entry = item
        if entry.formatting == "pt":
            return record.get(entry.columns["prompt"]) or ""
        batch = {k: [v] for k, v in record.items()}
        return _render(data.to_messages(entry)(batch, [0])["messages"][0], tok)

    return Source(name, where, lambda: (((r, e), w) for r, w, e in records()), to_text)


def _render(messages, tok) -> str:
    if getattr(tok, "chat_template", None):
        try:
            return tok.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template that rejects these roles: plain text is fine for calibration
            pass
    return "\n\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))


def token_blocks(source: Source, tokenizer, seq_len: int, samples: int, eval_samples: int) -> Blocks:
    """Documents + EOS, concatenated and cut into seq_len blocks; evenly spaced blocks (at most
    eval_samples, about a fifth of a short source) are held out for perplexity, the rest calibrate."""
    want = (samples + eval_samples) * seq_len
    ids: list[int] = []
    for record, w in source.records():
        text = source.to_text(record, w, tokenizer)
        if text and text.strip():
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= want:
            break
    n = len(ids) // seq_len
    if n < 2:
        fit = f"lower --calib-seq-len (at most {len(ids) // 2}) or add text" if len(ids) >= 32 else "add text"
        raise DevopsError(f"calibration data too short: {len(ids)} tokens, but one sample plus one held-out block "
                          f"need 2 x --calib-seq-len = {2 * seq_len}", source.where, fit)
    n_held = min(eval_samples, max(1, n // 5))
    held_at = {(2 * i + 1) * n // (2 * n_held) for i in range(n_held)}
    chunks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    return Blocks(calib=[c for i, c in enumerate(chunks) if i not in held_at][:samples],
                  held=[c for i, c in enumerate(chunks) if i in held_at], tokens_read=len(ids))
