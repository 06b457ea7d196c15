"""The `eval` command: flags, or an eval recipe (configs/eval.yaml) whose keys are the flags' names
with underscores; flags given on the command line win. The options are EvalOptions' fields
(options.command). No torch import at module level."""

from __future__ import annotations

from pathlib import Path

from devops_cli.eval.run import EvalOptions
from devops_cli.options import command


def evaluate(options: EvalOptions, where) -> None:
    from devops_cli.console import console
    from devops_cli.eval import run

    if not options.model:
        for key, value in default_model(options.adapter).items():
            setattr(options, key, value)
    path = run.output_path(options, where)
    result = run.run(options, where)
    run.write(result, path)
    console.print(run.table(result))
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


eval_command = command(
    EvalOptions, evaluate,
    doc="The 574-question DevOps exam, 0-5 shots, first-token scoring: [bold]devops-model eval --model PATH --shots 5[/]",
    recipe_help="eval recipe (configs/eval.yaml); flags override its keys", aliases={"model_name_or_path": "model"},
    shown={"model": "the newest finished run under runs/"})
