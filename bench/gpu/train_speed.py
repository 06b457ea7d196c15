"""Training speed on a random Qwen2 of a real shape, through a real `devops-model` launch (1 GPU, nccl).

    python bench/gpu/train_speed.py --run lora-7b|full-1.5b [--steps N] [--plan] [--result FILE]

lora-7b:   LoRA r=64 on every linear layer of the 7B shape (bf16 base), 2048-token packed blocks
           (`devops-model pt`: documents concatenated and cut into blocks, no padding), batch 4,
           gradient checkpointing off, attention `sdpa`. Per token the sft stage does the same work:
           only which tokens are labelled differs, and sft batches of the bundled QA are short.
full-1.5b: full fine-tuning of the 1.5B shape, `devops-model sft` on the bundled QA (ChatML), bf16
           autocast over fp32 master weights, batch 8, non-padding tokens counted.

Figures: tokens/s over the whole train loop (the Trainer's count, start-up excluded; metrics.json),
the steady state from the TensorBoard wall times of steps 3..N (the kit runs 16 steps) (logging every step), MFU by the 6N
convention (N = all parameters, against the GPU's dense bf16 peak), and peak GPU memory allocated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, peak_flops, saved_qwen2, shape, tokenizer, write_result  # noqa: E402

RUNS = {
    "lora-7b": dict(shape="7b", stage="pt", seq=2048, batch=4,
                    keys=["finetuning_type=lora", "lora_rank=64", "lora_alpha=128", "lora_dropout=0.0",
                          "gradient_checkpointing=false"]),
    # sft batches count conversations, packed without padding: 24 of the bundled QA's (~280 tokens each) make
    # ~6.7k tokens a step, and a worst case (24 x 1024) the memory plan fits in 140 GiB (batch 8: 2.2k tokens a step left
    # the 1.5B model idle, 1.2 % MFU on an H200)
    "full-1.5b": dict(shape="1.5b", stage="sft", seq=1024, batch=24,
                      keys=["finetuning_type=full", "gradient_checkpointing=false"]),
    "full-1.5b-liger": dict(shape="1.5b", stage="sft", seq=1024, batch=24,
                            keys=["finetuning_type=full", "gradient_checkpointing=false", "use_liger_kernel=true"]),
}  # fmt: skip
PLAN = {"seq": 128, "batch": 4, "steps": 4}


def steady_tokens_per_second(out: Path, skip: int = 2) -> tuple[float | None, int]:
    """Non-padding tokens per second between the `skip`-th logged step and the last one, from the
    TensorBoard event wall times (the first steps hold kernel selection and allocator growth)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((out / "runs").rglob("events.out.tfevents.*"))
    if not files:
        return None, 0
    acc = EventAccumulator(str(files[-1].parent), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    tag = next((t for t in tags if t.endswith("num_input_tokens_seen")), None)
    if tag is None:
        return None, 0
    events = sorted(acc.Scalars(tag), key=lambda e: e.step)
    if len(events) <= skip + 1:
        return None, len(events)
    a, b = events[skip], events[-1]
    return (b.value - a.value) / (b.wall_time - a.wall_time), b.step - a.step


def launch_argv(spec: dict, model_dir: Path, out: Path, seq: int, batch: int, steps: int, bf16: bool) -> list[str]:
    lengths = [f"max_source_length={seq}"] if spec["stage"] == "pt" else \
        [f"max_source_length={seq // 2}", f"max_target_length={seq // 2}"]  # fmt: skip
    datasets = "devops_corpus_en,devops_corpus_zh" if spec["stage"] == "pt" else "devops_qa,devops_chat"
    argv = [sys.executable, "-m", "devops_cli", spec["stage"], f"stage={spec['stage']}", f"model_name_or_path={model_dir}",
            f"dataset={datasets}", f"output_dir={out}", "overwrite_output_dir=true", *spec["keys"], *lengths,
            f"bf16={str(bf16).lower()}", "attn_implementation=sdpa", f"per_device_train_batch_size={batch}",
            f"max_steps={steps}", "save_steps=100000", "val_size=0", "eval_steps=null", "logging_steps=1",
            "report_to=tensorboard", "plot_loss=false", "learning_rate=1e-5", "warmup_ratio=0.0", "nproc_per_node=1"]
    return argv + (["template=chatml"] if spec["stage"] == "sft" else [])


def dry_run(spec: dict, work: Path, steps: int) -> str:
    """The GPU run's own recipe (real shape, bf16, its sequence and batch) through `--dry-run` on a
    config-only folder: every recipe check and the memory plan, here, before any GPU time is spent."""
    from transformers import Qwen2Config

    cfg_dir = work / f"config-{spec['shape']}"
    Qwen2Config(**shape(spec["shape"], False), tie_word_embeddings=spec["shape"] == "1.5b",
                max_position_embeddings=32768).save_pretrained(cfg_dir)  # fmt: skip
    tokenizer().save_pretrained(cfg_dir)  # the kit's tokenizer: a model folder without one is refused before the plan
    argv = launch_argv(spec, cfg_dir, work / "dry-run", spec["seq"], spec["batch"], steps, True) + ["--dry-run"]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"--dry-run of the GPU recipe exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    keep = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith(("# memory plan", "#   ", "warning:"))]
    return "\n".join(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", choices=list(RUNS), required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--plan", action="store_true", help="CPU dry mode: the GPU recipe through --dry-run, and (lora-7b) "
                    "a tiny-shape launch in float32 over gloo")  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("/tmp/devops-gpu-kit"))
    ap.add_argument("--result")
    args = ap.parse_args()
    spec = RUNS[args.run]
    work = args.work / ("plan" if args.plan else "gpu")
    if "use_liger_kernel=true" in spec["keys"]:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            write_result(args.result, {"lines": [f"{args.run}: skipped, liger-kernel is not installed"]})
            return
    plan_text = dry_run(spec, work, args.steps) if args.plan else None
    if args.plan and args.run != "lora-7b":  # the same launch code runs in lora-7b's tiny launch
        write_result(args.result, {"plan": plan_text, "lines": [f"{args.run}: GPU recipe checked with --dry-run "
                                                                 f"(memory plan: {plan_total(plan_text)})"]})
        return
    seq, batch, steps = (PLAN["seq"], PLAN["batch"], PLAN["steps"]) if args.plan else (spec["seq"], spec["batch"], args.steps)
    t0 = time.perf_counter()
    model_dir, params = saved_qwen2(work / f"qwen2-{spec['shape']}-random", shape(spec["shape"], args.plan), args.plan,
                                    tied=spec["shape"] == "1.5b")
    built = time.perf_counter() - t0
    out = work / f"run-{args.run}"
    t1 = time.perf_counter()
    r = subprocess.run(launch_argv(spec, model_dir, out, seq, batch, steps, not args.plan), cwd=ROOT)
    wall = time.perf_counter() - t1
    if r.returncode:
        sys.exit(f"train_speed {args.run}: devops-model {spec['stage']} exited {r.returncode}")
    m = json.loads((out / "metrics.json").read_text())
    steady, span = steady_tokens_per_second(out)
    peak, gpu = peak_flops(args.plan)
    tps = m["train_tokens_per_second"]
    mfu = (lambda t: 6 * params * t / peak) if peak else (lambda t: None)
    figures = {
        "run": args.run, "stage": spec["stage"], "shape": spec["shape"] + (" (plan: tiny stand-in)" if args.plan else ""),
        "params": params, "gpu": gpu, "attn_implementation": m.get("attn_implementation"),
        "packing": m.get("packing"), "use_liger_kernel": m.get("use_liger_kernel"), "startup": m.get("startup"), "seq": seq, "batch": batch, "steps": m["global_step"],
        "tokens": m["train_tokens"], "tokens_per_s": tps, "steady_tokens_per_s": steady, "steady_steps": span,
        "mfu_6n": mfu(tps), "steady_mfu_6n": mfu(steady) if steady else None,
        "peak_gpu_allocated_gib": m.get("peak_cuda_allocated_bytes", 0) / 2**30, "peak_rss_gib": m["peak_rss_bytes"] / 2**30,
        "train_loss": m.get("train_loss"), "build_s": built, "launch_wall_s": wall,
    }  # fmt: skip
    per_step = m["train_tokens"] / max(1, m["global_step"])
    figures["tokens_per_step"] = per_step
    shutil.rmtree(out, ignore_errors=True)  # a 1.5B full run's checkpoint is 18 GB: the next run needs the disk
    pct = lambda x: f"{100 * x:.1f} %" if x is not None else "n/a"  # noqa: E731
    steady_txt = f"{steady:,.0f}" if steady else "n/a"
    lines = [f"{args.run}: {params / 1e9:.2f}B params, {spec['stage']} {'LoRA r=64' if 'lora' in args.run else 'full'}, "
             f"{seq} tokens x batch {batch} ({per_step:,.0f} tokens a step), {m['global_step']} steps on {gpu}: {tps:,.0f} tokens/s whole loop "
             f"(MFU 6N {pct(figures['mfu_6n'])}), steady {steady_txt} tokens/s (MFU 6N {pct(figures['steady_mfu_6n'])}), "
             f"peak GPU {figures['peak_gpu_allocated_gib']:.1f} GiB allocated"]  # fmt: skip
    if plan_text:
        lines.append(f"{args.run}: GPU recipe checked with --dry-run (memory plan: {plan_total(plan_text)})")
    write_result(args.result, {"figures": figures, "lines": lines, "plan": plan_text})


def plan_total(text: str | None) -> str:
    line = next((x for x in (text or "").splitlines() if x.strip().startswith("#   total")), "")
    return " ".join(line.split()[2:4]) + " per GPU" if line else "not printed"


if __name__ == "__main__":
    main()
