"""Model and adapter folders checked before anything loads or launches, cheaply and without torch:
config JSON parses, every weight file the folder names is there, and every safetensors file is whole
(its header parses and the file is as long as the header says). A truncated download or a disk that
filled up is then one line naming the file, not a SafetensorError from inside a worker.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from devops_cli.errors import DevopsError


def check_model_dir(path: Path, where: str | None = None) -> None:
    """A local model folder: config.json and its weights (raises DevopsError naming the file)."""
    _json(path / "config.json", where, required=True)
    _weights(path, where)


def check_adapter_dir(path: Path, where: str | None = None) -> None:
    """A LoRA adapter folder: adapter_config.json (a JSON object naming its base) and its weights."""
    config = _json(path / "adapter_config.json", where, required=True)
    if not isinstance(config, dict):
        raise DevopsError(f"{path / 'adapter_config.json'}: must be a JSON object", where)
    _weights(path, where, prefix="adapter_model")


def _json(path: Path, where: str | None, required: bool):
    if not path.is_file():
        if required:
            raise DevopsError(f"'{path.parent}' has no {path.name}", where)
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DevopsError(f"{path}: not UTF-8 text (a binary or damaged file)", where, "restore it from the source") from None
    except json.JSONDecodeError as e:
        raise DevopsError(f"{path}:{e.lineno}: invalid JSON ({e.msg})", where, "restore it from the source") from None


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
