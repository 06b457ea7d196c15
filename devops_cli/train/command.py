"""The training commands: `pt`, `sft` and `dpo` (recipe -> checks -> the machine and memory plan -> launch),
`export` (merge a LoRA adapter) and `keys` (the recipe keys). No torch import at module level."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from devops_cli.console import console, info, warn
from devops_cli.errors import DevopsError, DevopsErrors, collect
from devops_cli.outputs import new_output_dir

RecipeArg = Annotated[Path | None, typer.Argument(help="YAML recipe (configs/*.yaml)", show_default=False)]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. learning_rate=1e-5",
                                                          show_default=False)]
DryRun = Annotated[bool, typer.Option("--dry-run", help="print the resolved recipe, memory plan and launch command (torchrun, or the worker for one process); run nothing")]
Force = Annotated[bool, typer.Option("--force", help="launch even when the memory plan says it will not fit (force=true)")]
DryRunShow = Annotated[bool, typer.Option("--dry-run", help="print the resolved recipe, memory plan and launch command "
                                          "(torchrun, or the worker for one process), and the first example of each "
                                          "dataset as the model will see it, trained spans marked; run nothing")]
Json = Annotated[bool, typer.Option("--json", help="with --dry-run: all of it as one JSON object on stdout (the "
                                    "examples' rendered text, trained character and token spans)")]


def _train(stage: str, recipe_path: Path | None, overrides: list[str] | None, dry_run: bool, force: bool,
           as_json: bool = False) -> None:
    from devops_cli.train import checks, launch, machine, recipe

    if as_json and not dry_run:
        raise DevopsError("--json goes with --dry-run", "--json", f"devops-model {stage} RECIPE --dry-run --json")
    overrides = list(overrides or []) + (["force=true"] if force else [])
    if recipe_path is not None and "=" in str(recipe_path) and not recipe_path.exists():
        overrides.insert(0, str(recipe_path))  # `devops-model sft key=value ...` with no file
        recipe_path = None
    r = recipe.load(recipe_path, overrides, stage=stage)
    errors: list[DevopsError] = []
    warnings = collect(errors, checks.check, r, default=[])
    resume = collect(errors, checks.resume_decision, r)
    plan = collect(errors, launch.plan, r)
    if errors:  # every problem at once, before anything is written
        raise DevopsErrors(errors)
    for w in warnings:
        warn(w)
    out = Path(r.output_dir)
    if resume is not None:
        r.resume_from_checkpoint = str(resume)
    argv = launch.worker_argv(plan, out / "recipe.yaml")
    # what this machine cannot run (precision, workers, the model's availability, DeepSpeed's needs, memory)
    trouble, memory = machine.problems(r, plan, machine.read_deepspeed(r))
    if dry_run and as_json:
        _dry_run_json(r, plan, argv, memory, trouble, warnings)
        return
    if dry_run:
        console.print(recipe.dump(r), markup=False, end="")
        console.print(f"# launch: {plan.describe()}", markup=False, soft_wrap=True)
        if memory is not None:
            console.print(memory.table(), markup=False, soft_wrap=True)
        console.print(launch.display(argv), markup=False, soft_wrap=True)
        for e in trouble:
            warn(f"on this machine the launch would stop: {e.line()}")
        if stage != "pt":
            from devops_cli.train import preview

            preview.show(console, *preview.safe_examples(r))
        return
    if trouble:  # before output_dir exists and before any worker starts
        raise DevopsErrors(trouble)

    out.mkdir(parents=True, exist_ok=True)
    # node 0 holds output_dir while the run lives (other nodes share it on shared storage)
    with launch.hold(out) if plan.node_rank == 0 else contextlib.nullcontext():
        if r.overwrite_output_dir:  # only what an earlier devops-model run wrote here goes
            ours, others = checks.own_checkpoints(out)
            for old in ours:
                shutil.rmtree(old)
            if ours:
                info(f"overwrite_output_dir: removed {', '.join(p.name for p in ours)} (the earlier run's checkpoints)")
            if others:
                warn(f"overwrite_output_dir: kept {', '.join(p.name for p in others)} in {out}: not written by devops-model")
        source = f"{recipe_path or 'command line'}" + (f" + {' '.join(overrides)}" if overrides else "")
        tmp = out / f".recipe.yaml.{os.getpid()}"  # atomic: other nodes may read it on a shared disk
        plan_lines = "\n" + "\n".join(line.removeprefix("# ") for line in memory.table().splitlines()) if memory else ""
        tmp.write_text(recipe.dump(r, f"from {source}\n{launch.display(argv)}{plan_lines}"), encoding="utf-8")
        tmp.replace(out / "recipe.yaml")
        info(f"[bold]{stage}[/] → {escape(str(out))}  ({escape(plan.describe())})")
        if memory is not None:
            info(escape(memory.line()))
        if resume is not None:
            info(f"resuming from {escape(str(resume))}")
        launch.env_for_workers()
        code = launch.run_here(plan, out / "recipe.yaml") if launch.in_process(plan) else launch.run(argv, out / "logs")
    if code == 0 and plan.node_rank == 0:
        _summary(out)
    if code:
        raise typer.Exit(code)


def _dry_run_json(r, plan, argv, memory, trouble, warnings) -> None:
    import json

    from devops_cli.train import launch

    out = {"recipe": r.to_dict(), "launch": plan.describe(), "command": launch.display(argv),
           "memory_plan": memory.to_dict() if memory is not None else None,
           "problems": [e.line() for e in trouble], "warnings": list(warnings)}
    if r.stage != "pt":
        from devops_cli.train import preview

        out["examples"], out["notes"] = preview.safe_examples(r)
    print(json.dumps(out, ensure_ascii=False, default=str))


def _summary(out: Path) -> None:
    import json

    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        return
    m = json.loads(metrics_file.read_text())
    parts = [f"{m.get('global_step')} steps", f"train loss {m.get('train_loss', float('nan')):.4f}"]
    if "eval_loss" in m:
        parts.append(f"eval loss {m['eval_loss']:.4f}")
    parts.append(f"{m.get('train_tokens_per_second', 0):.0f} tokens/s")
    console.print(f"[green]done[/]: {', '.join(parts)} → {escape(str(out))}  (metrics.json, logs/, runs/)")


def pt(recipe: RecipeArg = None, overrides: Overrides = None, dry_run: DryRun = False, force: Force = False) -> None:
    """Continued pretraining on your DevOps corpus: [bold]devops-model pt configs/7b-pt.yaml key=value ...[/]"""
    _train("pt", recipe, overrides, dry_run, force)


def sft(recipe: RecipeArg = None, overrides: Overrides = None, dry_run: DryRunShow = False, force: Force = False,
        as_json: Json = False) -> None:
    """Supervised fine-tuning (full or LoRA) on DevOps QA: [bold]devops-model sft configs/7b-sft.yaml[/]"""
    _train("sft", recipe, overrides, dry_run, force, as_json)


def dpo(recipe: RecipeArg = None, overrides: Overrides = None, dry_run: DryRunShow = False, force: Force = False,
        as_json: Json = False) -> None:
    """Preference alignment (DPO, IPO, hinge, KTO) on chosen/rejected answers: [bold]devops-model dpo configs/7b-dpo-lora.yaml[/]"""
    _train("dpo", recipe, overrides, dry_run, force, as_json)


def export(
    adapter: Annotated[Path, typer.Option("--adapter", help="LoRA adapter directory (an sft output_dir)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="where the merged model goes")],
    model: Annotated[str | None, typer.Option("--model", help="base model (default: the adapter's)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="write into a non-empty output dir")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
) -> None:
    """Merge a LoRA adapter into its base model: full weights loadable with from_pretrained."""
    from devops_cli.modeling import adapter_base, merge_adapter

    new_output_dir(output, overwrite)
    base = model or adapter_base(adapter)
    if model:
        adapter_base(adapter)  # its files are checked first either way
    merge_adapter(adapter, output, base, trust_remote_code)
    console.print(f"[green]merged[/] {escape(str(adapter))} into {escape(base)} → {escape(str(output))}")
    bits = _trained_bits(adapter)
    if bits:
        info(f"the adapter was trained on a {bits}-bit (QLoRA) base; it is merged onto the unquantized base weights "
             f"({escape(base)}), so the merged model is full precision — quantize it with `devops-model quantize`")


def _trained_bits(adapter: Path) -> int | None:
    """quantization_bit of the run that saved this adapter (its output_dir's recipe.yaml), if any."""
    from devops_cli.train.recipe import is_resolved, read_resolved

    for folder in (adapter, adapter.parent):
        if is_resolved(folder / "recipe.yaml"):
            return read_resolved(folder / "recipe.yaml").get("quantization_bit")
    return None


def keys() -> None:
    """List every recipe key with its default and meaning."""
    from rich.table import Table

    from devops_cli.train.recipe import REQUIRED, schema

    table = Table("key", "default", "meaning", box=None, header_style="bold")
    for f in schema():
        if f.name == "extra":
            continue
        default = "required" if f.default == REQUIRED else repr(f.default)
        choices = f.metadata.get("choices")
        table.add_row(f.name, default, f.metadata["help"] + (f" ({' | '.join(choices)})" if choices else ""))
    console.print(table)
    console.print("Any other transformers.TrainingArguments field passes through, checked for type.")
