"""What this machine can run, asked before a launch (no torch import): its GPUs, their bf16 support and
memory, its CPU cores, whether a model it needs is here or reachable, what a DeepSpeed config needs,
and whether the recipe's memory plan fits. Problems found here are about the machine, not the recipe:
a launch stops on them (one line each), `--dry-run` lists them and goes on, `force=true` launches anyway
past the memory plan."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

from devops_cli.errors import DevopsError
from devops_cli.sources import hub_reachable, is_hub_id

# DeepSpeed optimizers whose kernels need CUDA (fused / compressed ones)
CUDA_OPTIMIZERS = {"onebitadam", "zerooneadam", "onebitlamb", "lamb", "fusedlamb", "fusedadam"}


@cache
def gpu_info() -> tuple[dict, ...]:
    """The GPUs torch would see ({"name", "memory" bytes, "capability" float}), from nvidia-smi, restricted to
    CUDA_VISIBLE_DEVICES. Without nvidia-smi: none (or as many as CUDA_VISIBLE_DEVICES lists, sizes unknown)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    wanted = None if cvd is None else [d.strip() for d in cvd.split(",") if d.strip() and d.strip() != "-1"]
    rows = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,compute_cap",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 4 and parts[0].isdigit():
                try:
                    cap = float(parts[3])
                except ValueError:
                    cap = 0.0
                rows.append({"index": parts[0], "name": parts[1], "memory": int(float(parts[2])) * 2**20, "capability": cap})
    if wanted is not None:
        if rows:
            rows = [g for g in rows if g["index"] in wanted]
        else:
            rows = [{"index": d, "name": "GPU", "memory": None, "capability": None} for d in wanted]
    return tuple(rows)


def visible_gpus(env=os.environ) -> int:
    """How many GPUs a worker would see: CUDA_VISIBLE_DEVICES of `env` when set, else nvidia-smi's list."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    return len(gpu_info())


def problems(r, launch, ds_config: dict | None) -> tuple[list[DevopsError], object]:
    """(what stops this recipe on this machine, the memory plan or None)."""
    from devops_cli.train import memory

    gpus = [g for g in gpu_info()]
    errors: list[DevopsError] = []

    def bad(key: str | None, message: str, hint: str) -> None:
        errors.append(DevopsError(message, r.where(key) if key and key in r.origin else None, hint))

    # --- workers: one per GPU, or one per core ----------------------------------------------------
    cores = os.cpu_count() or 1
    src = launch.sources.get("nproc_per_node", "")
    if gpus and launch.nproc_per_node > len(gpus):
        bad("nproc_per_node", f"nproc_per_node {launch.nproc_per_node} [{src}] but this node has {len(gpus)} visible GPU(s)",
            f"use nproc_per_node <= {len(gpus)} (one worker per GPU)")
    if not gpus and launch.nproc_per_node > cores:
        bad("nproc_per_node", f"nproc_per_node {launch.nproc_per_node} [{src}] on a node with no GPU and {cores} CPU "
            "core(s): each CPU worker needs a core of its own", f"use nproc_per_node <= {cores}")
    # --- precision ----------------------------------------------------------------------------------
    for key in ("bf16", "fp16"):
        if getattr(r, key) and not gpus:
            bad(key, f"{key} is on, but this machine has no GPU (CPU training runs in float32 here)",
                f"set {key}=false to train on this machine, or run on GPUs"
                + (" with bf16 (compute capability 8.0+: A100, H100, L40, RTX 30/40)" if key == "bf16" else ""))
    old = [g for g in gpus if g["capability"] is not None and g["capability"] < 8.0]
    if r.bf16 and old:
        bad("bf16", f"bf16 is on, but {old[0]['name']} (compute capability {old[0]['capability']}) has no bf16",
            "set bf16=false fp16=true (Qwen may need a lower learning rate in fp16), or use an Ampere or newer GPU")
    # --- liger-kernel (a TrainingArguments pass-through): Triton kernels, GPU only ---------------------
    if r.extra.get("use_liger_kernel"):
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            bad("use_liger_kernel", "use_liger_kernel is on, but liger-kernel is not installed",
                "pip install liger-kernel (in this venv), or set use_liger_kernel=false")
        elif not gpus:
            bad("use_liger_kernel", "use_liger_kernel is on, but its kernels are Triton GPU kernels and this machine "
                "has no GPU", "set use_liger_kernel=false to train here, or run on GPUs")
    errors += libraries(r, bool(gpus))
    # --- the model ----------------------------------------------------------------------------------
    name = r.model_name_or_path
    if is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
        except Exception:
            cached = False
        if not cached and not hub_reachable():
            bad("model_name_or_path", f"model '{name}' is neither a local directory nor in the hub cache, and the "
                "hub cannot be reached from here", "download it where the hub is reachable (huggingface-cli download "
                f"{name}) and point model_name_or_path at the folder")
    # --- DeepSpeed ----------------------------------------------------------------------------------
    if ds_config is not None:
        errors += _deepspeed_here(r, ds_config, bool(gpus))
    # --- memory (for a worker count this machine can run) -----------------------------------------
    plan, args = memory.plan_recipe(r, launch.nproc_per_node, launch.nnodes, gpus, ds_config)
    workers_refused = any("nproc_per_node" in e.message for e in errors)  # a plan for them would say nothing
    if plan is not None and plan.device == "GPU" and not gpus:
        bad(None, f"memory plan: this run needs about {memory.gib(plan.need)} per GPU, {launch.nproc_per_node} "
            f"GPU(s) per node, and this machine has no GPU ({memory.gib(memory.host_memory())} of RAM)",
            f"run it on GPUs with at least {memory.gib(plan.need)} each (--dry-run shows the plan)")
    elif plan is not None and not plan.fits and not r.force and not workers_refused:
        fixes = memory.cheaper(r, *args)
        where = f"{plan.device}" + (f" ({gpus[0]['name']})" if gpus else "")
        have = memory.gib(plan.available) if plan.available is not None else "?"
        host = (f"; offloaded states {memory.gib(plan.host_need)} of {memory.gib(plan.host_available)} CPU RAM"
                if plan.host_rows else "")
        bad(None, f"memory plan: this run needs about {memory.gib(plan.need)} per {where}, this machine has "
            f"{have}{host}", ("it fits with: " + "; or ".join(fixes) if fixes else "no single change makes it fit here")
            + " — force=true launches anyway (--dry-run shows the plan)")
    return errors, plan


# report_to name -> the module transformers' callback imports (any one of them)
REPORTERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
             "comet_ml": ("comet_ml",), "clearml": ("clearml",), "neptune": ("neptune",), "dvclive": ("dvclive",),
             "swanlab": ("swanlab",), "trackio": ("trackio",), "azure_ml": ("azureml",), "codecarbon": ("codecarbon",),
             "dagshub": ("dagshub",), "flyte": ("flytekit",), "kubeflow": ()}  # fmt: skip
FLASH = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def libraries(r, gpu: bool) -> list[DevopsError]:
    """What the recipe names that a worker would import after the model loaded: report_to's loggers and
    flash-attention (which also needs a CUDA GPU)."""
    import importlib.util

    out = []

    def where(key: str) -> str | None:
        return r.where(key) if key in r.origin else None

    for name in (t.strip() for t in r.report_to.split(",") if t.strip()):
        if name in ("none", "all"):
            continue
        if name not in REPORTERS:
            out.append(DevopsError(f"report_to '{name}' is not a logger transformers knows", where("report_to"),
                                   f"use none, all, or some of {', '.join(REPORTERS)}"))
        elif REPORTERS[name] and not any(importlib.util.find_spec(m) for m in REPORTERS[name]):
            out.append(DevopsError(f"report_to names {name}, which is not installed", where("report_to"),
                                   f"pip install {REPORTERS[name][0]} (in this venv), or drop it from report_to"))
    module = FLASH.get(r.attn_implementation or "")
    if module and importlib.util.find_spec(module) is None:
        out.append(DevopsError(f"attn_implementation {r.attn_implementation} needs the {module} package, which is not "
                               "installed", where("attn_implementation"), "pip install flash-attn, or use sdpa"))
    elif module and not gpu:
        out.append(DevopsError(f"attn_implementation {r.attn_implementation} runs on CUDA GPUs and this machine has none",
                               where("attn_implementation"), "use sdpa (or eager) to train here"))
    return out


def _deepspeed_here(r, config: dict, gpu: bool) -> list[DevopsError]:
    out = []
    where = r.where("deepspeed")
    zero = config.get("zero_optimization") or {}
    for part in ("offload_optimizer", "offload_param"):
        offload = zero.get(part) or {}
        if offload.get("device") == "nvme" and not offload.get("nvme_path"):
            out.append(DevopsError(f"{part}.device is nvme but no nvme_path is set in the DeepSpeed config", where,
                                   f'add "nvme_path": "/local_nvme" to {part}, or use "device": "cpu"'))
        elif offload.get("device") == "nvme" and not Path(offload["nvme_path"]).is_dir():
            out.append(DevopsError(f"{part}.nvme_path '{offload['nvme_path']}' is not a folder on this machine", where,
                                   "point it at a local NVMe folder, or offload to cpu"))
    optimizer = str((config.get("optimizer") or {}).get("type", "")).lower()
    if optimizer in CUDA_OPTIMIZERS and not gpu:
        out.append(DevopsError(f"the DeepSpeed optimizer {optimizer!r} needs CUDA kernels and this machine has no GPU", where,
                               "drop the optimizer block (the Trainer's AdamW is used) or run on GPUs"))
    offloads = any((zero.get(p) or {}).get("device") in ("cpu", "nvme") for p in ("offload_optimizer", "offload_param"))
    if not gpu and not shutil.which(os.environ.get("CXX", "c++")):
        out.append(DevopsError("DeepSpeed on CPU builds its communication op" + (" and CPU Adam" if offloads else "")
                               + " with a C++ compiler, and this machine has none", where,
                               "install one (apt-get install g++), or train without deepspeed here"))
    return out


