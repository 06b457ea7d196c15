"""`devops-model convert`: a released Qwen v1 checkpoint (CodeFuse-DevOps-Model 7B/14B) -> native Qwen2.

No torch import here: `devops-model --help` stays instant; convert.py imports it when it runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from devops_cli.console import console


def convert_command(
    model: Annotated[Path, typer.Option("--model", help="Qwen v1 checkpoint directory (config.json, qwen.tiktoken, "
                                        "*.bin or *.safetensors)", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="new directory for the Qwen2 checkpoint",
                                         show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")] = False,
    max_shard_size: Annotated[float, typer.Option(help="largest output shard, in GB")] = 5.0,
) -> None:
    """Convert a Qwen v1 checkpoint (remote code, transformers 4.32) into a native Qwen2ForCausalLM one.

    Weights become safetensors shards, converted one source shard at a time; qwen.tiktoken becomes tokenizer.json with the ChatML template; generation_config keeps the v1 stop tokens. No remote code runs. Every --model command does this by itself, once, into DIR-qwen2 next to DIR.
    """
    import math

    from devops_cli import lifeline
    from devops_cli.convert.qwen_v1 import convert
    from devops_cli.errors import DevopsError

    if not (math.isfinite(max_shard_size) and 0.001 <= max_shard_size <= 1024):
        raise DevopsError(f"--max-shard-size {max_shard_size} is not a size in GB", "--max-shard-size",
                          "use 0.001 to 1024 (5 is the usual)")
    start = time.perf_counter()

    def progress(done: int, total: int, name: str) -> None:
        console.print(f"  [dim]{done}/{total}[/] {escape(name)}")

    with lifeline.on_stop_signals():  # SIGTERM / Ctrl-C: 143 / 130 with one line, the temporary folder removed
        out = convert(model, output, overwrite=overwrite, max_shard_bytes=int(max_shard_size * 1024**3), progress=progress)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
    console.print(f"[green]converted[/] {escape(str(model))} → {escape(str(out))} "
                  f"(Qwen2ForCausalLM, {size:.2f} GB, {time.perf_counter() - start:.0f} s)")
