"""Local data files (JSON, JSON lines, CSV, text; compressed or not) -> a datasets Dataset whose columns
are fixed by the dataset's entry, not guessed by datasets from the first 10 MB of a file.

datasets' json loader takes its columns from the file's first block: an optional key (history, system)
that first appears past it fails the run after launch ("An error occurred while generating the
dataset"), and a column null in the whole first block gets no type. Here every record is read by the
same reader as the pre-launch checks (records.file_records, the one reading rule) and projected onto
the columns the entry maps, with explicit features: a missing or null optional column is None in that
record, as LLaMA-Factory reads it. Parquet files and hub datasets keep datasets' own loaders.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from devops_cli import records
from devops_cli.dataset_info import DatasetEntry
from devops_cli.errors import DevopsError

STRINGS = ("prompt", "query", "response", "system", "chosen", "rejected")
REASONING = "reasoning_content"  # an assistant message's reasoning (vLLM's name; `reasoning` is read as it too)
# a message's tool fields, kept as JSON text (their shapes vary by record; tools.py reads them back)
TOOL_FIELDS = ("tool_calls", "function_call", "tool_call_id", "name")


def features(entry: DatasetEntry):
    """The datasets Features of `entry`'s records, by formatting: strings, history pairs, messages."""
    from datasets import Features, Value

    try:
        from datasets import List
    except ImportError:  # datasets < 4
        from datasets import Sequence as List
    c, tags = entry.columns, entry.tags
    text = Value("string")
    message = {tags["role_tag"]: text, tags["content_tag"]: text, REASONING: text, **{f: text for f in TOOL_FIELDS}}
    if entry.formatting == "pt":
        return Features({c["prompt"]: text})
    if entry.formatting == "sharegpt":
        out = {c["messages"]: List(message)}
        out.update({c[k]: text for k in ("system", "tools") if c.get(k) and c[k] in features_names(entry)})
        if entry.kto:
            out[c["kto_tag"]] = Value("bool")
        elif entry.ranking:
            out[c["chosen"]] = message
            out[c["rejected"]] = message
        return Features(out)
    out = {c[role]: text for role in STRINGS if role in c}
    out[c["history"]] = List(List(text))
    return Features(out)


def _text(value):
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)  # checked before launch: only a file changed since gets here


def _json_text(value):
    """A tool field as text: strings as they are (LLaMA-Factory writes JSON strings), anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _message(entry: DatasetEntry, value):
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, dict):
        return None if value is None else {entry.tags["role_tag"]: None, entry.tags["content_tag"]: _text(value),
                                           REASONING: None, **{f: None for f in TOOL_FIELDS}}
    return {entry.tags["role_tag"]: _text(value.get(entry.tags["role_tag"])),
            entry.tags["content_tag"]: _text(value.get(entry.tags["content_tag"])),
            REASONING: _text(value.get(REASONING, value.get("reasoning"))),
            **{f: _json_text(value.get(f)) for f in TOOL_FIELDS}}


def project(entry: DatasetEntry, record: dict) -> dict:
    """`record` with exactly the entry's columns: absent or null ones None, each of its feature's shape."""
    c = entry.columns
    out = {}
    for name in features_names(entry):
        value = record.get(name)
        if entry.formatting == "alpaca" and name == c.get("history"):
            value = [[_text(x) for x in pair] if isinstance(pair, list) else None for pair in value] \
                if isinstance(value, list) else None
        elif entry.formatting == "sharegpt" and name == c.get("messages"):
            value = [_message(entry, m) for m in value] if isinstance(value, list) else None
        elif entry.formatting == "sharegpt" and name in (c.get("chosen"), c.get("rejected")) and not entry.kto:
            value = _message(entry, value)
        elif entry.kto and name == c.get("kto_tag"):
            value = value if isinstance(value, bool) else None
        else:
            value = _text(value)
        out[name] = value
    return out


def features_names(entry: DatasetEntry) -> list[str]:
    c = entry.columns
    if entry.formatting == "pt":
        return [c["prompt"]]
    if entry.formatting == "sharegpt":
        extra = [c[k] for k in ("system", "tools") if c.get(k) and not entry.ranking and not entry.kto]
        return [c["messages"]] + ([c["kto_tag"]] if entry.kto else [c["chosen"], c["rejected"]] if entry.ranking else extra)
    return list(dict.fromkeys([c[role] for role in STRINGS if role in c] + [c["history"]]))


def generate(entry: DatasetEntry, files: list):
    """Every record of `files` ((path, size, mtime) triples: the cache key of the built dataset changes
    with the files), projected."""
    for path, _, _ in files:
        for where, record, problem in records.file_records(entry, Path(path)):
            if problem or not isinstance(record, dict):
                raise DevopsError(problem or "a record must be a JSON object", where,
                                  "the file changed after the checks: run the command again")
            yield project(entry, record)


BATCH = 10_000  # records per Arrow record batch written
FORMAT = 1  # bump when project() changes what it writes: cached files of the old shape are not reused


def load(entry: DatasetEntry, streaming: bool = False):
    """The entry's local files as a Dataset, written once to an Arrow file in datasets' cache (keyed by
    the files' paths, sizes and times and the entry's columns; rebuilt when any changes), or an
    IterableDataset read on the fly with `streaming`."""
    import datasets

    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in entry.files]
    feats = features(entry)
    if streaming:
        return datasets.IterableDataset.from_generator(generate, features=feats, gen_kwargs={"entry": entry, "files": files})
    key = json.dumps([FORMAT, files, entry.formatting, entry.ranking, entry.kto, entry.columns, entry.tags], sort_keys=True)
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "devops-model" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.arrow"
    if not cache.is_file():
        _write(entry, files, feats, cache)
    return datasets.Dataset.from_file(str(cache))


def _write(entry: DatasetEntry, files: list, feats, cache: Path) -> None:
    """Records -> Arrow, a batch at a time (pyarrow builds each batch; no per-record encoding), under a
    temporary name renamed at the end (another rank or run may read the cache)."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
    schema = feats.arrow_schema
    try:
        with ArrowWriter(features=feats, path=str(tmp)) as writer:
            batch: list[dict] = []
            for record in generate(entry, files):
                batch.append(record)
                if len(batch) == BATCH:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            writer.finalize()
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)


def cause(e: BaseException) -> BaseException:
    """The DevopsError (or else the innermost exception) under a library's wrapper ("An error occurred
    while generating the dataset"), so the one line names what went wrong."""
    seen, chain = e, []
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return next((x for x in chain if isinstance(x, DevopsError)), chain[-1])
