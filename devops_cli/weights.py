"""Model and adapter folders checked before anything loads or launches, cheaply and without torch:
config JSON parses, every weight file the folder names is there, and every safetensors file is whole
(its header parses and the file is as long as the header says). A truncated download or a disk that
filled up is then one line naming the file, not a SafetensorError from inside a worker.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from devops_cli.errors import DevopsError
from devops_cli.reading import check_file, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "qwen.tiktoken")


def check_model_dir(path: Path, where: str | None = None, tokenizer: bool = False) -> None:
    """A local model folder: config.json (a JSON object) and its weights; with `tokenizer`, also a
    tokenizer whose ids all have a row in the embeddings (raises DevopsError naming the file)."""
    config = _json(path / "config.json", where, required=True)
    if not isinstance(config, dict):
        raise DevopsError(f"{path / 'config.json'}: must be a JSON object, got a {type(config).__name__}", where,
                          "restore it from the source")
    _weights(path, where)
    if tokenizer:
        check_tokenizer(path, config, where)


def check_tokenizer(path: Path, config: dict, where: str | None = None) -> None:
    """The folder has a tokenizer, and (where tokenizer.json says) no token id past the embedding rows."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DevopsError(f"'{path}' has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...)", where,
                          "copy the tokenizer files of the model it was made from into it")
    rows = _embedding_rows(path, config)
    if rows is None or not (path / "tokenizer.json").is_file():
        return
    tok = _json(path / "tokenizer.json", where, required=True)
    vocab = (tok.get("model") or {}).get("vocab") if isinstance(tok, dict) else None
    ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1] if isinstance(vocab, list) else []
    ids += [t.get("id") for t in (tok.get("added_tokens") or []) if isinstance(t, dict)] if isinstance(tok, dict) else []
    top = max((i for i in ids if isinstance(i, int)), default=-1)
    if top >= rows:
        raise DevopsError(f"'{path}': the tokenizer has token id {top}, the embeddings have {rows} rows "
                          "(vocab_size): the vocabulary does not match the weights", where,
                          "use the tokenizer the model was trained with (or resize the embeddings and save again)")


def _embedding_rows(path: Path, config: dict) -> int | None:
    """Rows of the input embedding: from the safetensors header that holds it, else config vocab_size."""
    for f in sorted(path.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n)) if n < 100_000_000 else {}
        except (OSError, ValueError, struct.error):
            continue
        for name, t in header.items():
            if name.endswith("embed_tokens.weight") or name.endswith("wte.weight"):
                shape = t.get("shape") if isinstance(t, dict) else None
                if shape:
                    return int(shape[0])
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    rows = text.get("vocab_size")
    return rows if isinstance(rows, int) else None


def check_adapter_dir(path: Path, where: str | None = None) -> None:
    """A LoRA adapter folder: adapter_config.json (a JSON object naming its base) and its weights."""
    config = _json(path / "adapter_config.json", where, required=True)
    if not isinstance(config, dict):
        raise DevopsError(f"{path / 'adapter_config.json'}: must be a JSON object", where)
    _weights(path, where, prefix="adapter_model")


def _json(path: Path, where: str | None, required: bool):
    if not os.path.lexists(path):
        if required:
            raise DevopsError(f"'{path.parent}' has no {path.name}", where)
        return None
    try:
        return read_json(path, where)
    except DevopsError as e:
        raise DevopsError(e.message, where, "restore it from the source") from None


def _weights(path: Path, where: str | None, prefix: str = "model") -> None:
    for index_name in (f"{prefix}.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = _json(path / index_name, where, required=False)
        if index is None:
            continue
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        if not shards:
            raise DevopsError(f"{path / index_name}: no weight_map", where, "restore it from the source")
        for shard in shards:
            if not (path / shard).is_file():
                raise DevopsError(f"{path / shard} is missing (listed in {index_name})", where,
                                  "the download or copy is incomplete: fetch the missing shard")
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        check_file(f, where, "weight file")
    for f in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            raise DevopsError(f"{f}: {problem}", where, "the file is damaged or incomplete: copy or download it again")
    for f in sorted(path.glob("*.bin")):
        if _looks_zip(f) and not zipfile.is_zipfile(f):
            raise DevopsError(f"{f}: truncated (its zip directory is missing)", where,
                              "the file is damaged or incomplete: copy or download it again")


def safetensors_problem(f: Path) -> str | None:
    """None if the file is a whole safetensors file: an 8-byte header length, a JSON header whose
    tensors' data offsets end exactly at the end of the file."""
    size = f.stat().st_size
    if size < 8:
        return f"truncated ({size} bytes; a safetensors file starts with an 8-byte header length)"
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            return f"truncated: its header says {n} header bytes, the file has {size - 8} after the length"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "damaged header (not JSON): not a safetensors file, or overwritten"
    if not isinstance(header, dict):
        return "damaged header (not a JSON object)"
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets") or ()) == 2]  # fmt: skip
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"truncated: {size} bytes, its header describes {need} ({(need - size) / 1e6:.1f} MB missing)"
    return None


def _looks_zip(f: Path) -> bool:
    with open(f, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"  # torch.save's zip format (legacy pickles are not checked)
