"""One rich Console for the whole tool, and rank-0 printing for workers."""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def info(*args, **kwargs) -> None:
    """Print on global rank 0 only (workers of a torchrun job all run the same code)."""
    if is_rank0():
        console.print(*args, **kwargs)


def warn(message: str) -> None:
    if is_rank0():
        err_console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def quiet_imports() -> None:
    """Third-party import-time noise stays out of our output: torchao (installed with the quantize extra)
    reports CUDA kernels it cannot load and torch deprecations on every transformers import."""
    import logging

    if not os.environ.get("DEVOPS_MODEL_DEBUG"):
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
