"""The hook every --model command goes through (modeling.py): a Qwen v1 directory or hub repo is
converted once (convert/qwen_v1.py) into a cache and the path of the copy is returned; and the warning
for windows past a converted model's trained length. Importing this module does not import torch."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rich.markup import escape

from devops_cli.console import err_console, is_rank0, warn
from devops_cli.convert.qwen_v1 import (
    KEEP,
    MARKER,
    _read_json,
    convert,
    fingerprint,
)
from devops_cli.errors import DevopsError
from devops_cli.hfcompat import NEW, OLD
from devops_cli.sources import is_hub_id, is_qwen_v1, local_config

CACHE_ENV = "DEVOPS_MODEL_CONVERT_CACHE"  # a folder for converted models when next-to-source won't do


def _say(message: str) -> None:
    """Progress goes to stderr: stdout may be a piped answer (chat --json) or a results table."""
    if is_rank0():
        err_console.print(escape(message), soft_wrap=True)


def _hub_source(repo_id: str) -> Path | None:
    """A hub repo that is Qwen v1 -> its local snapshot (weights, configs, vocabulary; never *.py)."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache

        config = try_to_load_from_cache(repo_id, "config.json")
        config = config if isinstance(config, str) else hf_hub_download(repo_id, "config.json")
        if not is_qwen_v1(json.loads(Path(config).read_text(encoding="utf-8"))):
            return None
        _say(f"{repo_id} is a Qwen v1 checkpoint: fetching its weights (its Python code is not needed)")
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "qwen.tiktoken",
                                                               *KEEP]))
    except Exception:  # not on the hub / offline and not cached: from_pretrained reports it
        return None


def cache_path(src: Path, name: str | None = None) -> Path:
    """Next to the source, unless that folder is read-only (hub caches, shared disks) or CACHE_ENV is set."""
    root = os.environ.get(CACHE_ENV)
    if root is None and name is None and os.access(src.parent, os.W_OK):
        return src.parent / f"{src.name}-qwen2"
    root = Path(root or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "devops-model" / "converted")
    tag = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]
    return root.expanduser() / f"{name or src.name}-{tag}-qwen2"


_RESOLVED: dict[tuple, str] = {}  # tokenizer and model of one command resolve the same name: say it once


def resolve_model(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """The path to load for --model: unchanged, or a Qwen v1 checkpoint's converted copy (made once)."""
    key = (name_or_path, str(cache_dir), os.environ.get(CACHE_ENV))
    if key in _RESOLVED and (Path(_RESOLVED[key]) / MARKER).is_file():
        return _RESOLVED[key]
    _RESOLVED[key] = _resolve(name_or_path, cache_dir)
    return _RESOLVED[key]


def _resolve(name_or_path: str, cache_dir: str | Path | None) -> str:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not is_qwen_v1(local_config(path)):
            return name_or_path
        src, name = path, None
    elif is_hub_id(name_or_path) and (src := _hub_source(name_or_path)) is not None:
        name = name_or_path.replace("/", "--")
    else:
        return name_or_path
    target = Path(cache_dir).expanduser() if cache_dir else cache_path(src, name)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):  # torchrun ranks resolve at once: one converts
        if (target / MARKER).is_file():
            record = _read_json(target / MARKER)
            if record.get("fingerprint") == fingerprint(src):
                _say(f"Qwen v1 checkpoint {src}: using its Qwen2 conversion in {target}")
                return str(target)
            _say(f"{src} changed since it was converted to {target}: converting it again")
        elif target.exists():
            raise DevopsError(f"'{target}' exists but was not made by devops-model convert",
                              hint=f"move it away, or set {CACHE_ENV} to a folder for converted models")
        _say(f"Qwen v1 checkpoint {src}: converting it once to native Qwen2 → {target}")
        convert(src, target, overwrite=True)
    return str(target)


def past_seq_length(config, n_tokens: int) -> str | None:
    """The warning for a window of n_tokens on a converted Qwen v1 model, or None where numerics match v1."""
    seq = getattr(config, "qwen_v1_seq_length", None)
    tricks = [t for t, key in (("logn attention", "qwen_v1_use_logn_attn"), ("dynamic NTK rope", "qwen_v1_use_dynamic_ntk"))
              if getattr(config, key, False)]
    if not seq or not tricks or n_tokens <= seq:
        return None
    return (f"{n_tokens} tokens is past this Qwen v1 model's trained length ({seq}): the original code switches on "
            f"{' and '.join(tricks)} there and the converted Qwen2 model does not, so its outputs past {seq} "
            f"tokens differ from the original's — keep the window within {seq} tokens")


def watch_seq_length(model) -> None:
    """Warn once when a forward pass of a converted Qwen v1 model sees more than seq_length positions."""
    if getattr(model.config, "qwen_v1_seq_length", None) is None:
        return

    def hook(module, args, kwargs):
        new = [kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")]
        n = max([x.shape[1] for x in new if x is not None and x.dim() > 1] or [0])
        cache = kwargs.get(NEW, kwargs.get(OLD))  # decoding: the tokens already cached come first
        if hasattr(cache, "get_seq_length"):
            n += cache.get_seq_length()
        if (mask := kwargs.get("attention_mask")) is not None and mask.dim() > 1:
            n = max(n, mask.shape[1])
        if not getattr(module, "_qwen_v1_warned", False) and (message := past_seq_length(module.config, n)):
            module._qwen_v1_warned = True
            warn(message)

    model.register_forward_pre_hook(hook, with_kwargs=True)
