"""`export --format safetensors` (the default): a LoRA adapter merged into its base model, full
weights loadable with from_pretrained. No torch import at module level."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from devops_cli.console import console, info
from devops_cli.outputs import new_output_dir, not_an_input, staged_dir


def merge(adapter: Path, output: Path, model: str | None, overwrite: bool, trust_remote_code: bool) -> None:
    from devops_cli.modeling import adapter_base, merge_adapter

    new_output_dir(output, overwrite, inputs={"adapter": adapter, "base model": model})
    base = model or adapter_base(adapter)
    if model:
        adapter_base(adapter)  # its files are checked first either way
    not_an_input(output, {"base model": base}, "--output")  # the adapter's own base, now known
    with staged_dir(output) as staged:  # the merged model appears whole or not at all
        merge_adapter(adapter, staged, base, trust_remote_code)
    console.print(f"[green]merged[/] {escape(str(adapter))} into {escape(base)} → {escape(str(output))}")
    bits = trained_bits(adapter)
    if bits:
        info(f"the adapter was trained on a {bits}-bit (QLoRA) base; it is merged onto the unquantized base weights "
             f"({escape(base)}), so the merged model is full precision — quantize it with `devops-model quantize`")


def trained_bits(adapter: Path) -> int | None:
    """quantization_bit of the run that saved this adapter (its output_dir's recipe.yaml), if any."""
    from devops_cli.train.recipe import is_resolved, read_resolved

    for folder in (adapter, adapter.parent):
        if is_resolved(folder / "recipe.yaml"):
            return read_resolved(folder / "recipe.yaml").get("quantization_bit")
    return None
