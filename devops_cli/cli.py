"""devops-model: the Typer app. Each command is a thin typed function; main() is the one error
boundary (DevopsError -> one red line per problem, exit 2; DEVOPS_MODEL_DEBUG=1 -> traceback).

Importing this module must not import torch: `devops-model --help` stays instant.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from devops_cli.chat.command import chat
from devops_cli.console import console, fail, fail_all, info, quiet_imports, warn
from devops_cli.convert.command import convert_command
from devops_cli.errors import DevopsError, DevopsErrors, collect
from devops_cli.eval.command import eval_command
from devops_cli.outputs import new_output_dir
from devops_cli.quantize.command import quantize_command

app = typer.Typer(
    name="devops-model",
    help="Continue-pretrain and align Qwen-family models on DevOps data — real torchrun / DeepSpeed workers.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

RecipeArg = Annotated[Path | None, typer.Argument(help="YAML recipe (configs/*.yaml)", show_default=False)]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. learning_rate=1e-5",
                                                          show_default=False)]
DryRun = Annotated[bool, typer.Option("--dry-run", help="print the resolved recipe, memory plan and torchrun argv; run nothing")]
Force = Annotated[bool, typer.Option("--force", help="launch even when the memory plan says it will not fit (force=true)")]


def _train(stage: str, recipe_path: Path | None, overrides: list[str] | None, dry_run: bool, force: bool) -> None:
    from devops_cli.train import checks, launch, machine, recipe

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
    argv = launch.torchrun_argv(plan, out / "recipe.yaml")
    # what this machine cannot run (precision, workers, the model's availability, DeepSpeed's needs, memory)
    trouble, memory = machine.problems(r, plan, machine.read_deepspeed(r))
    if dry_run:
        console.print(recipe.dump(r), markup=False, end="")
        console.print(f"# launch: {plan.describe()}", markup=False, soft_wrap=True)
        if memory is not None:
            console.print(memory.table(), markup=False, soft_wrap=True)
        console.print(launch.display(argv), markup=False, soft_wrap=True)
        for e in trouble:
            warn(f"on this machine the launch would stop: {e.line()}")
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
        code = launch.run(argv, out / "logs")
    if code == 0 and plan.node_rank == 0:
        _summary(out)
    if code:
        raise typer.Exit(code)


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


def sft(recipe: RecipeArg = None, overrides: Overrides = None, dry_run: DryRun = False, force: Force = False) -> None:
    """Supervised fine-tuning (full or LoRA) on DevOps QA: [bold]devops-model sft configs/7b-sft.yaml[/]"""
    _train("sft", recipe, overrides, dry_run, force)


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


def tiny(
    output: Annotated[Path, typer.Argument(help="directory for the model")],
    hidden_size: Annotated[int, typer.Option(help="hidden size (>= 128 for GPTQ group size 128)")] = 128,
    layers: Annotated[int, typer.Option(help="transformer layers")] = 2,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size")] = 4096,
    seed: Annotated[int, typer.Option(help="init seed")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty directory")] = False,
) -> None:
    """Build a tiny Qwen2 model + BPE tokenizer from the bundled corpus (smoke tests, demos)."""
    from devops_cli.tiny import build

    out = build(output, hidden_size=hidden_size, num_layers=layers, vocab_size=vocab_size, seed=seed,
                overwrite=overwrite)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    console.print(f"[green]tiny model[/] → {escape(str(out))} ({size:.1f} MB)")


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






# the workflow's order: train, compress, measure, use; then the tools around it
app.command()(pt)
app.command()(sft)
app.command("quantize")(quantize_command)
app.command("eval")(eval_command)
app.command("chat")(chat)
app.command("convert")(convert_command)
app.command()(export)
app.command()(tiny)
app.command()(keys)


# commands that leave nothing to clean up when they succeed (results and transcripts are written and
# closed, no worker processes): they end without the interpreter's teardown of torch and transformers,
# which takes ~0.7 s (4% of a whole 5-shot exam on a small model; a fifth of a one-shot chat on it).
_NO_TEARDOWN = ("eval", "chat")


def _click_classes(name: str) -> tuple:
    """`name` (ClickException, Exit, Abort) from every click the app may raise: typer >= 0.29 bundles
    its own (typer._click, whose ClickException is a typer.TyperException), earlier typer uses click."""
    import importlib

    found = []
    for module in (typer.BadParameter.__module__, "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
        if cls is not None and cls not in found:
            found.append(cls)
    found += [c for c in (getattr(typer, name, None),) if isinstance(c, type) and c not in found]
    return tuple(found)


def usage_line(e) -> str:
    """A usage error as one line: where (the command), what (click's own message, with its 'did you
    mean'), how to see the accepted forms."""
    message = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "devops-model"
    return f"{path}: {message} — see '{path} --help'"


def main(argv: list[str] | None = None) -> None:
    quiet_imports()
    try:
        code = app(args=argv, prog_name="devops-model", standalone_mode=False)
    except _click_classes("Exit") as e:
        code = e.exit_code
    except _click_classes("Abort"):
        fail("aborted")
        code = 130
    except _click_classes("ClickException") as e:
        if os.environ.get("DEVOPS_MODEL_DEBUG"):
            raise
        fail(usage_line(e))
        code = 2
    except DevopsError as e:
        if os.environ.get("DEVOPS_MODEL_DEBUG"):
            raise
        fail_all(e)
        code = e.exit_code
    except KeyboardInterrupt:
        fail("interrupted")
        code = 130
    # only as the process itself (console script, python -m): a caller passing argv keeps running
    if argv is None and not code and sys.argv[1:2] and sys.argv[1] in _NO_TEARDOWN and "torch" in sys.modules:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, OSError):  # a reader that went away (`| head`) is not an error
                pass
        os._exit(0)
    sys.exit(code or 0)
