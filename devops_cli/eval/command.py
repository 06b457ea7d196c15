"""The `eval` command: flags, or an eval recipe (configs/eval.yaml) whose keys are the flags' names
with underscores; flags given on the command line win. No torch import at module level."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from devops_cli.train.recipe import apply_flags, read_command_recipe

Opt = typer.Option


def eval_command(
    recipe: Annotated[Path | None, typer.Argument(help="eval recipe (configs/eval.yaml); flags override its keys",
                                                     show_default=False)] = None,
    model: Annotated[str | None, Opt("--model", "-m", help="model directory or hub id", show_default=False)] = None,
    shots: Annotated[int | None, Opt("--shots", "-k", help="exemplars per question, 0-5 (default: 0)",
                                        show_default=False)] = None,
    data_dir: Annotated[Path | None, Opt("--data-dir", help="CSVs in CMMLU/C-Eval layout (default: the hub datasets)",
                                            show_default=False)] = None,
    subjects: Annotated[str | None, Opt("--subjects", help="a,b | all (default: the six DevOps exam subjects)",
                                           show_default=False)] = None,
    protocol: Annotated[str | None, Opt("--protocol", help="devops-eval | cmmlu | ceval | lm-eval (default: devops-eval)",
                                           show_default=False)] = None,
    chat: Annotated[bool | None, Opt("--chat/--no-chat", help="ChatML prompt (default: on for chat models)",
                                        show_default=False)] = None,
    system: Annotated[str | None, Opt("--system", help="system message for --chat", show_default=False)] = None,
    adapter: Annotated[Path | None, Opt("--adapter", help="LoRA adapter directory", show_default=False)] = None,
    batch_size: Annotated[str | None, Opt("--batch-size", help="N | auto (default: auto)", show_default=False)] = None,
    dtype: Annotated[str | None, Opt("--dtype", help="auto | float32 | bfloat16 | float16 (default: auto)",
                                        show_default=False)] = None,
    device: Annotated[str | None, Opt("--device", help="auto | cpu | cuda[:N] (default: auto)", show_default=False)] = None,
    output: Annotated[Path | None, Opt("--output", "-o", help="results JSON (default: runs/eval/<model>-<protocol>-<k>shot.json)",
                                          show_default=False)] = None,
    limit: Annotated[int | None, Opt("--limit", help="score only the first N questions of each subject",
                                        show_default=False)] = None,
    trust_remote_code: Annotated[bool, Opt("--trust-remote-code", help="run the model's own Python code")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="replace an existing --output")] = False,
) -> None:
    """The 574-question DevOps exam, 0-5 shots, first-token scoring: [bold]devops-model eval --model PATH --shots 5[/]"""
    from devops_cli.console import console
    from devops_cli.eval import run as evaluate

    flags = {"model": model, "shots": shots, "data_dir": data_dir, "subjects": subjects, "protocol": protocol,
             "chat": chat, "system": system, "adapter": adapter, "batch_size": batch_size, "dtype": dtype,
             "device": device, "output": output, "limit": limit, "trust_remote_code": trust_remote_code or None, "overwrite": overwrite or None}  # fmt: skip
    values, origin = read_recipe(recipe) if recipe is not None else ({}, {})
    values, where = apply_flags(values, origin, flags)
    if not values.get("model"):
        values.update(default_model(values.get("adapter")))
    options = evaluate.EvalOptions(**values)
    path = evaluate.output_path(options, where)

    result = evaluate.run(options, where)
    evaluate.write(result, path)
    console.print(evaluate.table(result))
    t = result["timings"]
    console.print(f"[green]done[/]: {result['overall']['correct']}/{result['overall']['n']} correct, "
                  f"{t['questions_per_s']:.1f} questions/s, {t['total_s']:.1f} s → {path}")  # fmt: skip


def default_model(adapter) -> dict:
    """No --model: the adapter's own base, or else the newest finished training run under runs/."""
    from devops_cli.console import info
    from devops_cli.errors import DevopsError
    from devops_cli.modeling import adapter_base
    from devops_cli.runs import finished

    if adapter:
        return {"model": adapter_base(Path(adapter))}
    runs = finished()
    if not runs:
        raise DevopsError("no --model given, and no finished training run under runs/", "--model",
                          "pass --model PATH_OR_HUB_ID (or train one: devops-model sft RECIPE)")
    run = runs[0]
    info(f"no --model: evaluating {run.describe()}, the newest run; pass --model to choose")
    return {"model": run.base, "adapter": str(run.path)} if run.base else {"model": str(run.path)}


def read_recipe(path: Path) -> tuple[dict, dict]:
    """An eval recipe: keys are the flags' names (model_name_or_path works for model)."""
    from devops_cli.eval.run import EvalOptions

    types = {"shots": (int,), "limit": (int, type(None)), "chat": (bool, type(None)), "trust_remote_code": (bool,), "overwrite": (bool,),
             "batch_size": (str, int)}  # fmt: skip
    values, origin = read_command_recipe(path, (f.name for f in dataclasses.fields(EvalOptions)), types,
                                         {"model_name_or_path": "model"})
    if "batch_size" in values:
        values["batch_size"] = str(values["batch_size"])
    return values, origin
