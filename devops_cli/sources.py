"""What a --model / model_name_or_path string names: a local folder (checked whole: config.json and
undamaged weights) or a hub id (owner/name). One rule for every command; no torch import."""

from __future__ import annotations

import json
import os
import re
import socket
from functools import cache
from pathlib import Path

from devops_cli.errors import DevopsError
from devops_cli.weights import check_model_dir

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """owner/name that is not a local path: neither the path nor its first part exists here (so
    runs/tiny, with a runs/ folder but no tiny in it, is a missing folder, not a hub repo)."""
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists() and not Path(name.split("/")[0]).is_dir()


def check_model_arg(name: str, where: str | None = None) -> None:
    """A local model folder must be one (config.json, whole weight files); a name that is neither a
    folder nor a hub id is a folder that does not exist."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DevopsError(f"'{name}' has no config.json, so it is not a model directory", where)
        check_model_dir(path, where, tokenizer=True)
    elif not is_hub_id(name):
        hint = "build the tiny demo model with `devops-model tiny runs/tiny`" if "tiny" in name else "check the path"
        raise DevopsError(f"model directory '{name}' does not exist", where, hint)


def local_config(name: str | Path) -> dict | None:
    """The config.json of a local model folder, or None: a hub id, no such folder, no config, or one
    that is not a readable JSON object (check_model_arg reports those)."""
    try:
        config = json.loads((Path(name).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_qwen_v1(config: dict | None) -> bool:
    """A Qwen v1 checkpoint's config (model_type "qwen" or QWenLMHeadModel): the one rule every command
    asks (convert/ turns such a model into Qwen2 once)."""
    return isinstance(config, dict) and (config.get("model_type") == "qwen"
                                         or "QWenLMHeadModel" in (config.get("architectures") or []))  # fmt: skip


def quantization(config: dict | None) -> dict | None:
    """How a model's weights are stored quantized (its quantization_config: GPTQ from `quantize`, or a
    hub checkpoint's method), or None for plain weights."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return q if isinstance(q, dict) else ({"quant_method": "unknown"} if q is not None else None)


def offline() -> bool:
    """Whether the user asked for no hub traffic: HF_HUB_OFFLINE read as huggingface_hub reads it
    ("1", "true", "yes", "on"; "0" or empty is online). The one reading of the flag."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be reached from here: not with HF_HUB_OFFLINE set, else a TCP
    connection to its host (HF_ENDPOINT's, or huggingface.co) within `timeout` seconds."""
    if offline():
        return False
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
