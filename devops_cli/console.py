"""One rich Console for the whole tool, and rank-0 printing for workers."""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape

# soft_wrap: a long path or message stays one line (logs, pipes, tests read them whole)
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


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


def fail_all(e, prefix: str = "") -> None:
    """A DevopsError (or DevopsErrors): one red line per problem."""
    for line in e.line().splitlines():
        fail(prefix + line)


def quiet_imports() -> None:
    """Third-party import-time noise stays out of our output: torchao (installed with the quantize extra)
    reports CUDA kernels it cannot load and torch deprecations on every transformers import."""
    import logging
    import warnings

    if not os.environ.get("DEVOPS_MODEL_DEBUG"):
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # peft 0.21 reads model.is_gradient_checkpointing, deprecated in transformers 5.24: peft's to change
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def import_quietly(module: str) -> bool:
    """Import a library that prints a banner on import (gptqmodel writes one to stdout, which would
    corrupt `chat --json`); peft imports gptqmodel whenever it is installed. False if it is absent."""
    import contextlib
    import importlib
    import importlib.util
    import io

    if importlib.util.find_spec(module) is None:
        return False
    if os.environ.get("DEVOPS_MODEL_DEBUG"):
        importlib.import_module(module)
    else:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            importlib.import_module(module)
    return True


def import_gptq_quietly() -> str | None:
    """Import gptqmodel + optimum (returns the name of a missing one). They print a banner and INFO lines
    at import and while packing; keep the tool's output ours (DEVOPS_MODEL_DEBUG=1 shows everything)."""
    import contextlib
    import io
    import logging
    import sys
    import warnings

    debug = bool(os.environ.get("DEVOPS_MODEL_DEBUG"))
    if not debug:  # their own deprecation notices, not the user's business (other libraries' still show)
        for module in ("gptqmodel", "optimum", "logbar", "device_smi", "defuser"):
            warnings.filterwarnings("ignore", category=FutureWarning, module=module)
            warnings.filterwarnings("ignore", category=UserWarning, module=module)
    missing = None
    with contextlib.redirect_stdout(io.StringIO() if not debug else sys.stdout), \
            contextlib.redirect_stderr(io.StringIO() if not debug else sys.stderr):
        try:
            import gptqmodel  # noqa: F401
            import optimum.gptq  # noqa: F401
        except ImportError as e:
            missing = e.name or "gptqmodel"
    if debug:
        return missing
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("logbar", "optimum"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # deepspeed (pulled in by transformers while saving) resets its logger's level on import; a filter stays
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    return missing
