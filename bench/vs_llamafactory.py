"""devops-model against LLaMA-Factory, side by side: the same tiny Qwen2 model, the same data (one
LLaMA-Factory dataset_info.json that both read), the same hyper-parameters, one process each.

    .venv/bin/python bench/vs_llamafactory.py [--steps 60] [--repeat 2] [--keep DIR]

LLaMA-Factory VERSION goes into its own git-ignored venv (.venv-llamafactory) the way bench/lmeval.py
sets up lm-eval, except that a .pth line shares only this project's torch (the same build and kernels
on both sides, no second download); everything else is what `pip install llamafactory` brings (its
pins of transformers, peft, trl, datasets, accelerate; no bitsandbytes, torchao or deepspeed). On a CPU torch its install needs two repairs, both its dependencies'
problem, not ours: PyPI's torchvision is built against CUDA torch and fails to import on a CPU torch
("operator torchvision::nms does not exist"; transformers imports it when present, and LLaMA-Factory's
import then fails), so it is uninstalled; torchaudio's compiled libraries fail to load the same way,
so they are moved aside (its Python modules import without them; text training never calls them).

Runs, alternating (LLaMA-Factory, devops-model, LLaMA-Factory, ...) so both see the same machine noise:
pt (full), sft full and sft LoRA, batch 8, fp32, lr 1e-3 cosine, no warm-up, --steps steps; repeat r
runs both tools with seed 42 + r (data order), so the spread of the loss over the repeats is the noise
the two tools' losses are compared against.
Per run, from the files each tool writes (trainer_state.json, all_results.json / metrics.json):
  tokens    the Trainer's count of non-padding input tokens (include_num_input_tokens_seen=non_padding)
  train s   the Trainer's train_runtime;   tokens/s = tokens / train s
  wall      the whole command, measured here;   fixed = wall - train s (start-up and shut-down)
  loss      the logged training loss at the last step
The best run of each (highest tokens/s; lowest fixed cost, lowest wall) is compared (tokens: the mean
ratio over runs of the same seed, so of the same examples); ratios are
devops-model over LLaMA-Factory (above 1 is faster for tokens/s; below 1 is cheaper for fixed cost);
losses are the mean over the repeats (seeds).

The losses are not the same number on both sides. The Trainer divides a batch's summed loss by
num_items_in_batch, and the transformers LLaMA-Factory pins (5.6) counts every label, the first of
each row included, though a causal LM predicts no token for it; transformers 5.24 (ours) counts the
shifted labels, the tokens really predicted. A pt batch of 256-token blocks so reads 255/256 of its
loss in LLaMA-Factory (exact: every block is full), and pt is compared on the predicted-token loss
(LLaMA-Factory's x 256/255, printed as its own line). sft is not corrected: LLaMA-Factory's "qwen"
template also trains the "\n" after each <|im_end|> (one more token per example: the tokens column),
so its sft loss is a different average, lower by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-llamafactory"
VERSION = "0.9.5"
PY = VENV / "bin" / "python"
SYSTEM = "You are a helpful assistant."  # in every sft record: both tools' templates then use the same one


def counts_unshifted_labels() -> bool:
    """Whether LLaMA-Factory's transformers divides the loss by all labels rather than the shifted ones
    (read from its Trainer's source: the fix counts `labels[..., 1:]`)."""
    site = subprocess.run([str(PY), "-c", "import transformers, os; print(os.path.dirname(transformers.__file__))"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    return 'batch["labels"][..., 1:]' not in (Path(site) / "trainer.py").read_text(encoding="utf-8")


def _imports(module: str) -> bool:
    return subprocess.run([str(PY), "-c", f"import {module}"], capture_output=True).returncode == 0


def setup() -> None:
    if PY.exists() and _imports("llamafactory.train.tuner"):
        return
    import torch

    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    site = Path(subprocess.run([str(PY), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    # this project's torch only (its packages and its dist-info, so pip counts it as installed): the
    # same kernels on both sides and no second torch download; everything else is LLaMA-Factory's own
    shared = VENV / "shared-torch"
    shared.mkdir(exist_ok=True)
    ours = Path(torch.__file__).parent.parent
    for entry in ["torch", "torchgen", "functorch", *(p.name for p in ours.glob("torch-*.dist-info"))]:
        if (ours / entry).exists() and not (shared / entry).exists():
            (shared / entry).symlink_to(ours / entry)
    (site / "_devops_model_torch.pth").write_text(f"{shared}\n")
    pin = VENV / "torch-pin.txt"  # and pip never replaces it
    pin.write_text(f"torch=={torch.__version__}\n")
    env = {**os.environ, "PIP_CONSTRAINT": str(pin)}
    print(f"installing llamafactory=={VERSION} into {VENV} (once; a few minutes)", flush=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", f"llamafactory=={VERSION}"], check=True, env=env)
    if not _imports("torchvision"):
        subprocess.run([str(PY), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=True)
        print("removed torchvision from its venv: PyPI's build does not import on this torch", flush=True)
    if not _imports("torchaudio"):
        lib = site / "torchaudio" / "lib"
        aside = VENV / "torchaudio-libs-aside"
        aside.mkdir(exist_ok=True)
        for so in lib.glob("*.so"):
            so.replace(aside / so.name)
        print(f"moved torchaudio's compiled libraries to {aside}: they do not load on this torch", flush=True)
    if not _imports("llamafactory.train.tuner"):
        sys.exit(f"llamafactory {VERSION} does not import in {VENV}:\n"
                 + subprocess.run([str(PY), "-c", "import llamafactory.train.tuner"], capture_output=True, text=True).stderr[-2000:])


def write_data(folder: Path) -> Path:
    """The bundled DevOps corpus (pt) and QA (sft, alpaca with history), in LLaMA-Factory's layout."""
    from devops_cli.dataset_info import BUNDLED_DIR

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for name in ("devops_corpus_en.jsonl", "devops_corpus_zh.jsonl"):
            for line in (BUNDLED_DIR / name).read_text(encoding="utf-8").splitlines():
                f.write(json.dumps({"text": json.loads(line)["text"]}, ensure_ascii=False) + "\n")
    with open(folder / "qa.jsonl", "w", encoding="utf-8") as f:
        for line in (BUNDLED_DIR / "devops_qa.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            record.setdefault("history", [])
            f.write(json.dumps({**record, "system": SYSTEM}, ensure_ascii=False) + "\n")
    info = {"corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}},
            "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                        "history": "history", "system": "system"}}}  # fmt: skip
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


# (stage, finetuning_type, dataset); every case trains the same tiny model from scratch
CASES = {"pt": ("pt", "full", "corpus"), "sft full": ("sft", "full", "qa"), "sft LoRA": ("sft", "lora", "qa")}
PT_BLOCK = 256  # pt: both concatenate the corpus and cut blocks of this many tokens
SFT_CUTOFF = 2048  # sft: long enough that neither tool truncates an example


def llamafactory_config(case: str, model: Path, data: Path, out: Path, steps: int, seed: int) -> dict:
    stage, kind, dataset = CASES[case]
    cfg = dict(model_name_or_path=str(model), stage=stage, do_train=True, finetuning_type=kind,
               dataset=dataset, dataset_dir=str(data), template="qwen",
               cutoff_len=PT_BLOCK if stage == "pt" else SFT_CUTOFF, overwrite_cache=True,
               output_dir=str(out), overwrite_output_dir=True, logging_steps=min(10, steps), save_steps=100000,
               save_strategy="no", plot_loss=False, report_to="none", per_device_train_batch_size=8,
               gradient_accumulation_steps=1, learning_rate=1e-3, lr_scheduler_type="cosine",
               max_steps=steps, bf16=False, fp16=False, seed=seed, val_size=0,
               include_num_input_tokens_seen="non_padding")  # fmt: skip
    if kind == "lora":
        cfg.update(lora_rank=8, lora_alpha=16, lora_dropout=0.0, lora_target="all")
    return cfg


def devops_overrides(case: str, model: Path, data: Path, out: Path, steps: int, seed: int) -> list[str]:
    stage, kind, dataset = CASES[case]
    o = [f"model_name_or_path={model}", f"dataset={dataset}", f"dataset_dir={data}", f"finetuning_type={kind}",
         f"output_dir={out}", "overwrite_output_dir=true", f"logging_steps={min(10, steps)}", "save_steps=100000",
         "plot_loss=false", "report_to=none", "per_device_train_batch_size=8", "gradient_accumulation_steps=1",
         "learning_rate=1e-3", "lr_scheduler_type=cosine", f"max_steps={steps}", "warmup_ratio=0", "bf16=false",
         "fp16=false", f"seed={seed}", "val_size=0", "eval_steps=null", "nproc_per_node=1"]  # fmt: skip
    if stage == "pt":
        o.append(f"max_source_length={PT_BLOCK}")
    else:
        o += ["template=chatml", f"max_source_length={SFT_CUTOFF // 2}", f"max_target_length={SFT_CUTOFF // 2}"]
    if kind == "lora":
        o += ["lora_rank=8", "lora_alpha=16", "lora_dropout=0", "lora_target=all"]
    return o


def measure(argv: list[str], out: Path, cwd: Path, env: dict, results: str) -> dict:
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if r.returncode:
        sys.exit(f"{' '.join(argv)}\nfailed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    state = json.loads((out / "trainer_state.json").read_text())
    runtime = json.loads((out / results).read_text())["train_runtime"]
    losses = [e for e in state["log_history"] if "loss" in e]
    tokens = state["num_input_tokens_seen"]
    return {"wall": wall, "train": runtime, "fixed": wall - runtime, "tokens": tokens, "tps": tokens / runtime,
            "loss": losses[-1]["loss"], "loss_step": losses[-1]["step"], "steps": state["global_step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per tool and case; the best counts")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--keep", type=Path, help="keep the runs here instead of a temporary directory")
    args = ap.parse_args()
    cases = [c.strip() for c in args.cases.split(",")]
    if unknown := [c for c in cases if c not in CASES]:
        sys.exit(f"unknown case(s) {unknown}: choose from {', '.join(CASES)}")
    setup()
    work = (args.keep or Path(tempfile.mkdtemp(prefix="bench-vs-lf-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "devops_cli", "tiny", str(model), "--overwrite"], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
    data = write_data(work / "data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(work / "hf-home")}  # fmt: skip
    env.pop("CUDA_VISIBLE_DEVICES", None)
    import yaml

    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeat):
        for case in cases:
            stage = CASES[case][0]
            out = work / f"lf-{case.replace(' ', '-')}"
            cfg = work / f"lf-{case.replace(' ', '-')}.yaml"
            cfg.write_text(yaml.safe_dump(llamafactory_config(case, model, data, out, args.steps, 42 + rep)))
            lf = measure([str(VENV / "bin" / "llamafactory-cli"), "train", str(cfg)], out, work, env, "all_results.json")
            out = work / f"dm-{case.replace(' ', '-')}"
            dm = measure([sys.executable, "-m", "devops_cli", stage, *devops_overrides(case, model, data, out, args.steps, 42 + rep)],
                         out, ROOT, env, "metrics.json")  # fmt: skip
            for tool, m in (("LLaMA-Factory", lf), ("devops-model", dm)):
                runs.setdefault((case, tool), []).append(m)
                print(f"rep {rep + 1} {case:<9} {tool:<13} wall {m['wall']:6.1f} s  train {m['train']:6.1f} s  "
                      f"fixed {m['fixed']:5.1f} s  {m['tokens']:>8} tokens  {m['tps']:7.0f} tokens/s  "
                      f"loss {m['loss']:.4f} @ {m['loss_step']}", flush=True)  # fmt: skip

    unshifted = counts_unshifted_labels()
    print(f"\n{args.steps} steps, batch 8, fp32, 1 process, {os.cpu_count()} CPU cores; best of {args.repeat} alternating "
          f"runs (seeds 42..{41 + args.repeat}); loss: mean over the seeds at step {args.steps}")
    print(f"{'case':<9} {'tool':<13} {'tokens/s':>9} {'train s':>8} {'wall s':>7} {'fixed s':>8} {'tokens':>8} {'loss':>7} {'seed spread':>12}")
    for case in cases:
        best = {}
        for tool in ("LLaMA-Factory", "devops-model"):
            ms = runs[(case, tool)]
            losses = [x["loss"] for x in ms]
            best[tool] = b = {**max(ms, key=lambda x: x["tps"]), "fixed": min(x["fixed"] for x in ms),
                              "wall": min(x["wall"] for x in ms), "loss": sum(losses) / len(losses),
                              "spread": max(losses) - min(losses)}  # fmt: skip
            print(f"{case:<9} {tool:<13} {b['tps']:>9.0f} {b['train']:>8.1f} {b['wall']:>7.1f} {b['fixed']:>8.1f} "
                  f"{b['tokens']:>8} {b['loss']:>7.4f} {b['spread']:>12.4f}")  # fmt: skip
        lf, dm = best["LLaMA-Factory"], best["devops-model"]
        if CASES[case][0] == "pt" and unshifted:  # the same loss as ours: per predicted token
            k = PT_BLOCK / (PT_BLOCK - 1)
            lf = {**lf, "loss": lf["loss"] * k, "spread": lf["spread"] * k}
            print(f"{case:<9} {'LF x256/255':<13} {'':>9} {'':>8} {'':>7} {'':>8} {'':>8} {lf['loss']:>7.4f} "
                  f"{lf['spread']:>12.4f}  (its loss per predicted token)")  # fmt: skip
        noise = max(lf["spread"], dm["spread"])
        verdict = "within" if abs(dm["loss"] - lf["loss"]) <= noise else "outside"
        pairs = zip(runs[(case, "devops-model")], runs[(case, "LLaMA-Factory")])  # the same seed: the same examples
        tokens = sum(d["tokens"] / f["tokens"] for d, f in pairs) / args.repeat
        print(f"{case:<9} {'ratio':<13} {dm['tps'] / lf['tps']:>8.2f}x {'':>8} {dm['wall'] / lf['wall']:>6.2f}x "
              f"{dm['fixed'] / lf['fixed']:>7.2f}x {tokens:>7.3f}x {dm['loss'] - lf['loss']:>+7.4f}"
              f"  ({verdict} the seed spread {noise:.4f})")  # fmt: skip
    print(f"runs in {work}")


if __name__ == "__main__":
    main()
