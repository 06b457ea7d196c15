"""The recipe's DeepSpeed config: read once it passed the checks, and its ZeRO stage (one rule for the
checks, the memory plan and the run). No torch import."""

from __future__ import annotations

import json
from pathlib import Path


def zero_stage(config: dict | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config (0 when it names none); None without DeepSpeed."""
    if config is None:
        return None
    return (config.get("zero_optimization") or {}).get("stage", 0)


def read_deepspeed(r) -> dict | None:
    """The recipe's DeepSpeed config as a dict (checks.py has already validated it), or None."""
    if not r.deepspeed:
        return None
    try:
        return json.loads(Path(r.deepspeed).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
