"""dataset_info.json: the registry of named datasets (CodeFuse-DevOps-Model / LLaMA-Factory format).

    {"devops_qa": {"file_name": "devops_qa.jsonl", "file_sha1": "...", "stage": "sft",
                   "columns": {"prompt": "instruction", "query": "input", "response": "output",
                               "history": "history"}},
     "chats":     {"file_name": "chats.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"}},
     "tool_use":  {"file_name": "tools.jsonl", "formatting": "sharegpt",  # LLaMA-Factory's tool data:
                   "columns": {"messages": "conversations", "tools": "tools", "system": "system"},
                   "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                            "assistant_tag": "gpt", "function_tag": "function_call",
                            "observation_tag": "observation"}},
     "corpus":    {"file_name": "corpus.txt", "stage": "pt"},
     "pairs":     {"file_name": "pairs.jsonl", "ranking": true,  # dpo: prompt/query + chosen/rejected
                   "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
     "kto":       {"file_name": "kto.jsonl", "ranking": true, "formatting": "sharegpt",
                   "columns": {"messages": "messages", "kto_tag": "kto_tag"}},
     "hub":       {"hf_hub_url": "org/name", "split": "train"}}

Light on purpose (no torch / datasets import): the pre-launch checks read it too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from devops_cli.errors import DevopsError, did_you_mean
from devops_cli.reading import COMPRESSIONS, read_json, split_suffix

BUNDLED_DIR = Path(__file__).parent / "assets" / "data"
LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}
ENTRY_KEYS = {"file_name", "hf_hub_url", "script_url", "file_sha1", "stage", "formatting", "columns",
              "tags", "split", "subset", "ranking"}  # fmt: skip
COLUMN_KEYS = {"prompt", "query", "response", "history", "system", "messages", "chosen", "rejected", "kto_tag",
               "tools"}
RANKING_STAGE = "dpo"  # the stage that trains on "ranking": true datasets (preference pairs, KTO tags)
DEFAULT_COLUMNS = {
    "pt": {"prompt": "text"},
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "system": "system"},
    "sharegpt": {"messages": "messages", "system": "system", "tools": "tools"},  # system, tools: when a record has them
}  # fmt: skip
RANKING_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}  # added for ranking datasets (not KTO ones)
DEFAULT_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                "assistant_tag": "assistant", "system_tag": "system",
                "function_tag": "function_call", "observation_tag": "observation"}  # fmt: skip
# sharegpt tool use, in LLaMA-Factory's names: a function_tag turn is the assistant's call(s) (its content the
# JSON of {"name", "arguments"} or a list of them), an observation_tag turn a tool result. OpenAI's form works
# too: assistant messages with "tool_calls" and messages of role "tool".


@dataclass
class DatasetEntry:
    name: str
    where: str  # "dir/dataset_info.json (dataset name)" for messages
    files: list[Path] = field(default_factory=list)  # local files (empty for hub datasets)
    loader: str | None = None  # datasets builder name: json | csv | text | parquet
    hub_id: str | None = None
    split: str = "train"
    subset: str | None = None
    formatting: str = "alpaca"  # alpaca | sharegpt | pt
    columns: dict[str, str] = field(default_factory=dict)
    explicit: set[str] = field(default_factory=set)  # column roles the user named
    tags: dict[str, str] = field(default_factory=dict)
    sha1: str | None = None
    ranking: bool = False  # preference data: chosen/rejected pairs, or single answers with a kto_tag

    @property
    def kto(self) -> bool:
        return self.ranking and "kto_tag" in self.explicit


def resolve_dir(dataset_dir: str) -> Path:
    return BUNDLED_DIR if dataset_dir == "bundled" else Path(dataset_dir)


def read_registry(dataset_dir: str, where: str) -> tuple[Path, dict]:
    root = resolve_dir(dataset_dir)
    if not root.is_dir():
        raise DevopsError(f"dataset_dir '{dataset_dir}' is not a directory", where,
                          "point dataset_dir at the folder holding dataset_info.json")
    info = root / "dataset_info.json"
    if not info.is_file():
        raise DevopsError(f"no dataset_info.json in '{dataset_dir}'", where,
                          "create one (see docs/datasets.md) or fix dataset_dir")
    registry = read_json(info)  # its own file:line names it
    if not isinstance(registry, dict):
        raise DevopsError("dataset_info.json must map dataset names to entries", str(info))
    return info, registry


def _types(raw: dict, loc: str) -> None:
    """Every entry key has the type LLaMA-Factory gives it (a list or a number where a name belongs is
    one line here, not a TypeError in a worker)."""
    for key in ("file_name", "hf_hub_url", "script_url", "file_sha1", "stage", "formatting", "split", "subset"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], str):
            got = type(raw[key]).__name__.replace("dict", "an object").replace("list", "a list")
            raise DevopsError(f"{key} must be a string, got {got} ({json.dumps(raw[key])[:40]})", loc,
                              "one file or folder per entry: a folder of files is read whole" if key == "file_name" else None)
    for key in ("columns", "tags"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise DevopsError(f"{key} must map names to strings, got {json.dumps(value)[:60]}", loc,
                              'e.g. "tags": {"role_tag": "from", "content_tag": "value"}' if key == "tags"
                              else 'e.g. "columns": {"prompt": "instruction", "response": "output"}')


def data_files(path: Path, loc: str) -> list[Path]:
    """The data files `file_name` names: the file, or a folder's files (hidden ones skipped). Compressed
    files count as the file they hold; a dangling link or a file of no data kind is one line."""
    if not path.is_dir():
        if not os.path.lexists(path):
            raise DevopsError(f"data file '{path}' not found", loc, "fix file_name (relative to dataset_dir)")
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    for p in files:
        inner, compression = split_suffix(p)
        if inner not in LOADERS:
            kinds = ", ".join(LOADERS)
            raise DevopsError(f"cannot read '{p}': not a data file ({kinds}; compressed as {', '.join(COMPRESSIONS)})",
                              loc, "move other files out of the data folder" if p != path else "convert it")
        if p.is_symlink() and not p.exists():
            raise DevopsError(f"data file '{p}' is a symlink to '{os.readlink(p)}', which does not exist", loc,
                              "point the link at the file, or remove it")
    if not files:
        raise DevopsError(f"data folder '{path}' holds no data files", loc, "add files, or fix file_name")
    return files


def resolve(name: str, dataset_dir: str, stage: str, where: str) -> DatasetEntry:
    """Look up one dataset name and check its entry (files exist, stage matches)."""
    info, registry = read_registry(dataset_dir, where)
    if name not in registry:
        hint = did_you_mean(name, registry) or f"defined: {', '.join(sorted(registry)) or 'none'}"
        raise DevopsError(f"dataset '{name}' is not defined in {info}", where, hint)
    raw = registry[name]
    loc = f"{info} (dataset '{name}')"
    if not isinstance(raw, dict):
        raise DevopsError("entry must be a mapping with file_name or hf_hub_url", loc)
    _types(raw, loc)
    unknown = set(raw) - ENTRY_KEYS
    if unknown:
        raise DevopsError(f"unknown entry key(s) {', '.join(sorted(unknown))}", loc,
                          f"allowed: {', '.join(sorted(ENTRY_KEYS))}")
    ranking = raw.get("ranking", False)
    if not isinstance(ranking, bool):
        raise DevopsError(f"ranking must be true or false, got {ranking!r}", loc)
    if ranking and stage != RANKING_STAGE:
        raise DevopsError(f"dataset is a ranking (preference) dataset; the recipe trains stage {stage}", loc,
                          f"train it with `devops-model {RANKING_STAGE}`, or name a {stage} dataset")
    if stage == RANKING_STAGE and not ranking:
        raise DevopsError(f"dataset is not a ranking dataset: {RANKING_STAGE} trains on preferences", loc,
                          'mark a preference dataset "ranking": true, with chosen/rejected (or kto_tag) columns')
    if raw.get("stage", stage) != stage:
        raise DevopsError(f"dataset is for stage {raw['stage']}, the recipe trains stage {stage}", loc,
                          f"use a {stage} dataset")
    columns = raw.get("columns") or {}
    if not isinstance(columns, dict) or set(columns) - COLUMN_KEYS:
        raise DevopsError(f"columns must map some of {', '.join(sorted(COLUMN_KEYS))} to column names", loc)
    if not ranking and set(columns) & {"chosen", "rejected", "kto_tag"}:
        raise DevopsError("chosen/rejected/kto_tag columns belong to a ranking dataset", loc,
                          f'add "ranking": true and train it with `devops-model {RANKING_STAGE}`')
    formatting = raw.get("formatting") or ("sharegpt" if "messages" in columns else "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DevopsError(f"formatting '{formatting}' is not alpaca or sharegpt", loc)
    if ranking and "kto_tag" in columns and (formatting != "sharegpt" or set(columns) & {"chosen", "rejected"}):
        raise DevopsError("a KTO dataset is sharegpt messages (ending with the answer) and a kto_tag column", loc,
                          'use "formatting": "sharegpt", "columns": {"messages": ..., "kto_tag": ...}')
    if stage == "pt":
        formatting = "pt"
    defaults = {**DEFAULT_COLUMNS[formatting], **(RANKING_COLUMNS if ranking and "kto_tag" not in columns else {})}
    entry = DatasetEntry(name=name, where=loc, formatting=formatting, split=raw.get("split", "train"),
                         subset=raw.get("subset"), sha1=raw.get("file_sha1"),
                         columns={**defaults, **columns}, explicit=set(columns),
                         tags={**DEFAULT_TAGS, **(raw.get("tags") or {})}, ranking=ranking)
    if "file_name" in raw:
        path = info.parent / raw["file_name"]
        files = data_files(path, loc)
        kinds = {LOADERS[split_suffix(p)[0]] for p in files}
        if len(kinds) != 1:
            raise DevopsError(f"'{path}' mixes {' and '.join(sorted(kinds))} files", loc, "one kind of file per dataset")
        entry.files, entry.loader = files, kinds.pop()
    elif "hf_hub_url" in raw:
        entry.hub_id = raw["hf_hub_url"]
    else:
        raise DevopsError("entry has neither file_name nor hf_hub_url", loc, "add file_name: <file>")
    return entry


def check_sha1(entry: DatasetEntry) -> str | None:
    """A warning line when file_sha1 does not match (CodeFuse's behaviour: warn, go on)."""
    if not entry.sha1 or len(entry.files) != 1:
        return None
    digest = hashlib.sha1(entry.files[0].read_bytes()).hexdigest()
    if digest != entry.sha1:
        return f"{entry.where}: file_sha1 {entry.sha1} does not match the file ({digest}); the data changed"
    return None
