"""The `quantize` command: flags, or a quantize recipe (YAML) whose keys are the flags' names with
underscores; flags given on the command line win. No torch import at module level."""

from __future__ import annotations

from devops_cli.options import command
from devops_cli.quantize.run import QuantizeOptions


def quantize(options: QuantizeOptions, where) -> None:
    from rich.markup import escape

    from devops_cli import lifeline
    from devops_cli.console import console
    from devops_cli.quantize import run

    with lifeline.on_stop_signals():  # SIGTERM / Ctrl-C: 143 / 130 with one line, the scratch folder removed
        report = run.run(options, where)
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
    d = r["decoder_weights"]
    t.add_row("decoder weights quantized", "", f"{100 * d['fraction_quantized']:.1f} %", "")
    t.add_row("perplexity", f"{p['before']:.4f}", f"{p['after']:.4f}", f"{100 * p['increase']:+.2f} %")
    t.caption = (f"perplexity on {p['held_out_tokens']} held-out tokens of the calibration source; seconds: "
                 f"quantize {s['quantize']:.1f} ({s['per_block']:.2f} per block), verify {s['verify']:.1f}, "
                 f"total {s['total']:.1f}")
    return t


quantize_command = command(
    QuantizeOptions, quantize,
    doc="GPTQ int4/int8 calibrated on your data, verified before saving: [bold]devops-model quantize -m MODEL -o DIR[/]",
    recipe_help="quantize recipe (YAML, keys = flag names); flags override it",
    aliases={"model_name_or_path": "model", "output_dir": "output"},
    helps={"dtype": "auto | float16 | bfloat16, for the parts GPTQ leaves unquantized (auto = float16)",
           "device": "auto | cpu | cuda[:N] (GPTQ has no mps kernels)"})
