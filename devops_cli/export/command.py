"""The `export` command: merge a LoRA adapter into full weights (safetensors), or write a verified
GGUF for llama.cpp / ollama (--format gguf). No torch import at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from devops_cli.console import console
from devops_cli.errors import DevopsError

FORMATS = ("safetensors", "gguf")


def export(
    output: Annotated[Path, typer.Option("--output", "-o", help="where the export goes (a new directory)")],
    adapter: Annotated[Path | None, typer.Option("--adapter", help="LoRA adapter directory (an sft output_dir): merged first")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="the model to export; with --adapter, its base (default: the adapter's)")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="safetensors (merged full weights) | gguf (llama.cpp / ollama)")] = "safetensors",
    quant: Annotated[str, typer.Option("--quant", help="GGUF type: f16 | bf16 | q8_0 | q4_0 | q4_k_m (the last two by llama.cpp's quantizer)")] = "f16",
    ollama: Annotated[bool, typer.Option("--ollama", help="also write an ollama Modelfile (TEMPLATE checked against the chat template)")] = False,
    name: Annotated[str | None, typer.Option("--name", help="the model's name in the GGUF and for `ollama create` (default: the output folder's)")] = None,
    max_ppl_increase: Annotated[float | None, typer.Option("--max-ppl-increase", help="allowed relative perplexity rise of the GGUF over the source (default per type: f16 0.001, bf16/q8_0 0.01, q4_0/q4_k_m 0.15)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty output dir (only once the new export is verified)")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
) -> None:
    """Merge a LoRA adapter into full weights, or write a verified GGUF (+ ollama Modelfile): [bold]devops-model export -m MODEL --format gguf --ollama -o DIR[/]"""
    if format not in FORMATS:
        raise DevopsError(f"--format {format} is not one devops-model writes", "--format", " | ".join(FORMATS))
    if format == "safetensors":
        if adapter is None:
            raise DevopsError("nothing to merge", "--adapter",
                              "pass --adapter ADAPTER (merged full weights), or --format gguf --model MODEL")
        for flag, given in (("--quant", quant != "f16"), ("--ollama", ollama), ("--max-ppl-increase", max_ppl_increase is not None)):
            if given:
                raise DevopsError(f"{flag} applies to --format gguf", flag, "add --format gguf")
        from devops_cli.export.merge import merge

        merge(adapter, output, model, overwrite, trust_remote_code)
        return
    from devops_cli.export import run

    report = run.run(run.GGUFOptions(model=model, adapter=str(adapter) if adapter else None, output=str(output),
                                     quant=quant, ollama=ollama, name=name, overwrite=overwrite,
                                     trust_remote_code=trust_remote_code, max_ppl_increase=max_ppl_increase))
    console.print(table(report))
    console.print(f"[green]done[/]: {escape(str(output / 'model.gguf'))} (gguf.json holds these figures)")
    if ollama:
        console.print(f"ollama create {escape(name or output.name)} -f {escape(str(output / 'Modelfile'))}")


def table(r: dict):
    from rich.table import Table

    def mb(n):
        return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"

    c, p = r["checks"], r["checks"]["perplexity"]
    t = Table("check", "result", box=None, header_style="bold",
              title=f"GGUF {r['quant']} ({r['architecture']}): {mb(r['bytes']['gguf'])}, "
                    f"{r['bytes']['bits_per_weight']:.2f} bits/weight, {r['tensors']} tensors")
    logits = c["logits"]
    if "max_abs_diff_vs_rounded_source" in logits:
        t.add_row("transformers reload = source rounded to the file's type",
                  f"max |Δlogit| {logits['max_abs_diff_vs_rounded_source']:.2g} (≤ {logits['tolerance']:.2g}); "
                  f"the rounding itself: {logits['rounding_noise']:.2g}")
    else:
        t.add_row("transformers reload vs source", f"max |Δlogit| {logits['max_abs_diff_vs_source']:.3g}")
    t.add_row("perplexity (held-out)", f"{p['source']:.4f} → {p['gguf_transformers']:.4f} ({100 * p['increase']:+.3f} %, "
                                       f"bound {100 * p['bound']:.1f} %)")
    cpp = c["llamacpp"]
    if cpp.get("run"):
        g = cpp["greedy_vs_gguf_transformers"]
        t.add_row("llama.cpp tokenizer = HF", f"equal ({cpp['tokenizer']['mixed_text_tokens']} mixed-text tokens"
                  + (f", {cpp['tokenizer']['chat_tokens']} chat tokens)" if cpp["tokenizer"]["chat_tokens"] else ")"))
        t.add_row("llama.cpp greedy = transformers", f"{sum(x['equal'] for x in g['prompts'])}/{len(g['prompts'])} prompts equal")
        t.add_row("llama.cpp perplexity", f"{cpp['perplexity']:.4f} ({100 * cpp['perplexity_vs_gguf_transformers']:+.3f} % vs transformers)")
    else:
        t.add_row("llama.cpp", f"not run: {cpp.get('reason')}")
    if c.get("modelfile"):
        m = c["modelfile"]
        equal = sum(1 for x in m["probes"].values() if x.get("equal"))
        t.add_row("Modelfile TEMPLATE = chat template", f"{m['family']}: {equal}/{len(m['probes'])} probe chats render the same"
                  + (f"; not carried: {', '.join(m['not_carried'])}" if m["not_carried"] else ""))
    return t
