"""The memory plan against real runs: peak resident memory of real `devops-model pt|sft` launches on
this machine's CPU (largest over the ranks, metrics.json's peak_rss_bytes) next to what the plan said
for the same resolved recipe, as a ratio (plan / measured).

    .venv/bin/python bench/memory.py [--steps 3] [--models tiny,mid,large] [--keep DIR]

Variants: full fine-tuning (DDP), with gradient checkpointing, LoRA, DeepSpeed ZeRO-2 and ZeRO-3 with
2 workers. Models are random Qwen2 built by the tiny kit: tiny 2x128 (1M parameters), mid 4x512 (15M),
large 8x1024 (103M). On GPUs the same launches record torch.cuda.max_memory_allocated as well.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {"tiny": {"hidden_size": 128, "num_layers": 2}, "mid": {"hidden_size": 512, "num_layers": 4, "num_heads": 8,
          "num_kv_heads": 4}, "large": {"hidden_size": 1024, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4}}  # fmt: skip
VARIANTS = {
    "full": ("pt", []),
    "full + grad. checkpointing": ("pt", ["gradient_checkpointing=true"]),
    "LoRA (sft)": ("sft", ["finetuning_type=lora"]),
    "ZeRO-2, 2 workers": ("pt", ["deepspeed=configs/deepspeed/zero2.json", "nproc_per_node=2"]),
    "ZeRO-3, 2 workers": ("pt", ["deepspeed=configs/deepspeed/zero3.json", "nproc_per_node=2"]),
}


def run(stage: str, model: Path, out: Path, steps: int, extra: list[str]) -> dict:
    argv = [sys.executable, "-m", "devops_cli", stage, str(ROOT / "configs" / f"tiny-{stage}.yaml"),
            f"model_name_or_path={model}", f"output_dir={out}", f"max_steps={steps}", "save_steps=100000",
            "val_size=0", "eval_steps=null", "report_to=none", "plot_loss=false", *extra]  # fmt: skip
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(argv)}\nfailed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def planned(out: Path):
    from devops_cli.train import dsconfig, machine, memory, recipe

    r = recipe.load(out / "recipe.yaml")
    plan, _ = memory.plan_recipe(r, r.nproc_per_node or 1, 1, machine.gpu_info(), dsconfig.read_deepspeed(r))
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", default="tiny,mid,large")
    ap.add_argument("--keep", type=Path)
    args = ap.parse_args()
    from devops_cli.tiny import build
    from devops_cli.train.memory import gib

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        model = build(work / name, **MODELS[name])
        for i, (variant, (stage, extra)) in enumerate(VARIANTS.items()):
            out = work / f"{name}-{i}-{stage}"
            metrics = run(stage, model, out, args.steps, extra)
            plan = planned(out)
            measured = metrics["peak_cuda_allocated_bytes"] if "peak_cuda_allocated_bytes" in metrics else metrics["peak_rss_bytes"]
            rows.append((name, variant, plan.shape.params, plan.need, measured))
            print(f"{name:>5} {variant:<28} plan {gib(plan.need):>10}  measured {gib(measured):>10}  "
                  f"plan/measured {plan.need / measured:.2f}", flush=True)
    print("\n| model | params | variant | plan per process | measured peak | plan / measured |")
    print("|---|---|---|---|---|---|")
    for name, variant, params, need, measured in rows:
        print(f"| {name} | {params / 1e6:.1f}M | {variant} | {gib(need)} | {gib(measured)} | {need / measured:.2f} |")


if __name__ == "__main__":
    main()
