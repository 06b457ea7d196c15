"""The `quantize` command: flags, or a quantize recipe (YAML) whose keys are the flags' names with
underscores; flags given on the command line win. No torch import at module level."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from devops_cli.train.recipe import apply_flags, read_command_recipe

Opt = typer.Option


def quantize_command(
    recipe: Annotated[Path | None, typer.Argument(help="quantize recipe (YAML, keys = flag names); flags override it",
                                                     show_default=False)] = None,
    model: Annotated[str | None, Opt("--model", "-m", help="model directory or hub id, or a LoRA adapter dir (merged first)",
                                        show_default=False)] = None,
    output: Annotated[Path | None, Opt("--output", "-o", help="directory for the quantized checkpoint", show_default=False)] = None,
    bits: Annotated[int | None, Opt("--bits", help="4 | 8 (default: 4)", show_default=False)] = None,
    group_size: Annotated[int | None, Opt("--group-size", help="columns per scale; -1 = one per row (default: 128)",
                                             show_default=False)] = None,
    desc_act: Annotated[bool | None, Opt("--desc-act/--no-desc-act", help="act-order: columns by activation size "
                                            "(default: off, faster kernels)", show_default=False)] = None,
    calib: Annotated[str | None, Opt("--calib", help="dataset name(s) from dataset_info.json, or a .jsonl/.json/.txt file "
                                        "(default: the bundled DevOps corpus)", show_default=False)] = None,
    calib_field: Annotated[str | None, Opt("--calib-field", help="jsonl/json text field (default: text, messages or "
                                              "instruction/output)", show_default=False)] = None,
    calib_samples: Annotated[int | None, Opt("--calib-samples", help="calibration samples (default: 128)",
                                                show_default=False)] = None,
    calib_seq_len: Annotated[int | None, Opt("--calib-seq-len", help="tokens per sample (default: 1024)",
                                                show_default=False)] = None,
    eval_samples: Annotated[int | None, Opt("--eval-samples", help="held-out blocks for perplexity before/after "
                                               "(default: 16)", show_default=False)] = None,
    dataset_dir: Annotated[str | None, Opt("--dataset-dir", help="folder with dataset_info.json for --calib names "
                                              "(default: bundled)", show_default=False)] = None,
    dtype: Annotated[str | None, Opt("--dtype", help="float16 | bfloat16 for the unquantized parts (default: float16)",
                                        show_default=False)] = None,
    device: Annotated[str | None, Opt("--device", help="auto | cpu | cuda[:N] (default: auto)", show_default=False)] = None,
    overwrite: Annotated[bool, Opt("--overwrite", help="replace a non-empty --output (only once the new one is verified)")] = False,
    trust_remote_code: Annotated[bool, Opt("--trust-remote-code", help="run the model's own Python code")] = False,
) -> None:
    """GPTQ int4/int8 calibrated on your data, verified before saving: [bold]devops-model quantize -m MODEL -o DIR[/]"""
    from rich.markup import escape

    from devops_cli.console import console
    from devops_cli.quantize import run as quantize

    flags = {"model": model, "output": output, "bits": bits, "group_size": group_size, "desc_act": desc_act,
             "calib": calib, "calib_field": calib_field, "calib_samples": calib_samples, "calib_seq_len": calib_seq_len,
             "eval_samples": eval_samples, "dataset_dir": dataset_dir, "dtype": dtype, "device": device,
             "overwrite": overwrite or None, "trust_remote_code": trust_remote_code or None}  # fmt: skip
    values, origin = read_recipe(recipe) if recipe is not None else ({}, {})
    values, where = apply_flags(values, origin, flags)
    options = quantize.QuantizeOptions(**values)

    report = quantize.run(options, where)
    console.print(table(report))
    console.print(f"[green]done[/]: {escape(report['output'])} (quantize.json holds these figures)")


def table(r: dict):
    from rich.table import Table

    def mb(n):
        return "-" if n is None else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"

    b, p, s, o = r["bytes"], r["perplexity"], r["seconds"], r["options"]
    t = Table("", "before", "after", "after/before", box=None, header_style="bold",
              title=f"int{o['bits']} GPTQ (group {o['group_size']}): {r['quantized_linears']} linears in "
                    f"{r['blocks']} blocks, {r['device']}")
    t.add_row("quantized linears", f"{mb(b['linear_fp16'])} fp16", mb(b["linear_quantized"]), f"{b['linear_ratio']:.3f}x")
    t.add_row("checkpoint vs fp16", mb(b["model_fp16"]), mb(b["weights_on_disk_after"]),
              f"{b['checkpoint_ratio_vs_fp16']:.3f}x")
    if b["weights_on_disk_before"]:
        t.add_row("weights on disk", mb(b["weights_on_disk_before"]), mb(b["weights_on_disk_after"]),
                  f"{b['weights_on_disk_after'] / b['weights_on_disk_before']:.3f}x")
    t.add_row("perplexity", f"{p['before']:.4f}", f"{p['after']:.4f}", f"{100 * p['increase']:+.2f} %")
    t.caption = (f"perplexity on {p['held_out_tokens']} held-out tokens of the calibration source; seconds: "
                 f"quantize {s['quantize']:.1f} ({s['per_block']:.2f} per block), verify {s['verify']:.1f}, "
                 f"total {s['total']:.1f}")
    return t


def read_recipe(path: Path) -> tuple[dict, dict]:
    """A quantize recipe: keys are the flags' names (model_name_or_path / output_dir work too)."""
    from devops_cli.quantize.run import QuantizeOptions

    types = {"bits": (int,), "group_size": (int,), "calib_samples": (int,), "calib_seq_len": (int,),
             "eval_samples": (int,), "desc_act": (bool,), "overwrite": (bool,), "trust_remote_code": (bool,)}  # fmt: skip
    return read_command_recipe(path, (f.name for f in dataclasses.fields(QuantizeOptions)), types,
                               {"model_name_or_path": "model", "output_dir": "output"})
