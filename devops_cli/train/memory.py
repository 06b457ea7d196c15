"""A memory plan before launch: what one training process will hold (one GPU, or one CPU worker),
from the recipe and the model's config.json alone (no weights loaded, no torch import unless the run
uses DeepSpeed), against what this machine has.

    weights, gradients, optimizer states   full fine-tuning: DeepSpeed's own estimators under ZeRO-2/3
                                            (deepspeed.runtime.zero.*.estimate_zero*_model_states_mem_needs),
                                            AdamW with fp32 master weights otherwise (16 bytes a parameter)
    LoRA                                    the frozen base in its load dtype (sharded under ZeRO-3), the
                                            adapter's weights + gradients + AdamW states in fp32 (a MoE: every
                                            expert's adapter, shape.py)
    activations                             per micro-batch token and layer: what a pre-norm decoder layer
                                            keeps for backward; with gradient checkpointing only each
                                            layer's input, plus one layer recomputed at a time
    logits                                  micro-batch tokens x vocabulary: the half-precision logits, their
                                            fp32 copy for the loss and its gradient (Qwen's 152k vocabulary
                                            makes this a large line)
    runtime                                 CUDA context and allocator slack per GPU; on CPU the measured
                                            resident size of a worker with torch/transformers/datasets loaded

Measured against real runs in bench/memory.py (README: Memory plan).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from devops_cli.train.machine import zero_stage
from devops_cli.train.shape import KNOWN, Shape, model_config  # noqa: F401  (KNOWN: the table of hub shapes)

GiB = 1024**3
GPU_RUNTIME = 1.0 * GiB  # CUDA context + caching-allocator slack, per GPU
CPU_RUNTIME = 0.65 * GiB  # a CPU worker before the model: the tiny model's workers peak at 0.7 GiB (bench/memory.py)


@dataclass
class Plan:
    rows: list[tuple[str, float]]  # per process (one GPU, or one CPU worker)
    device: str  # "GPU" | "CPU worker"
    available: float | None  # bytes one process may use here (None: unknown)
    host_rows: list[tuple[str, float]] = field(default_factory=list)  # per node, CPU RAM (offload)
    host_available: float | None = None
    source: str = ""
    shape: Shape | None = None
    processes: int = 1  # per node

    @property
    def need(self) -> float:
        return sum(b for _, b in self.rows)

    @property
    def host_need(self) -> float:
        return sum(b for _, b in self.host_rows)

    @property
    def fits(self) -> bool:
        return (self.available is None or self.need <= self.available) and \
            (self.host_available is None or self.host_need <= self.host_available)  # fmt: skip

    def line(self) -> str:
        have = f"{gib(self.available)} available per {self.device}" if self.available else "machine memory unknown"
        out = f"memory plan: {gib(self.need)} per {self.device} ({have})"
        if self.host_rows:
            host = f" of {gib(self.host_available)}" if self.host_available else ""
            out += f"; {gib(self.host_need)} of CPU RAM per node for offloaded states{host}"
        return out

    def to_dict(self) -> dict:
        return {"device": self.device, "processes_per_node": self.processes, "source": self.source,
                "parameters": self.shape.params if self.shape else None,
                "active_parameters": self.shape.active_params if self.shape else None,
                "rows": [{"what": name, "bytes": int(b)} for name, b in self.rows],
                "host_rows": [{"what": name, "bytes": int(b)} for name, b in self.host_rows],
                "need_bytes": int(self.need), "available_bytes": self.available, "fits": self.fits}

    def table(self) -> str:
        s = self.shape
        active = f" ({s.active_params / 1e9:.2f}B active per token: {s.experts_per_token} of {s.experts} experts)" \
            if s.experts else ""
        lines = [f"# memory plan per {self.device} ({self.processes} per node), model {s.params / 1e9:.2f}B "
                 f"parameters{active} from {self.source}:"]
        lines += [f"#   {name:<38} {gib(b):>10}" for name, b in self.rows]
        here = gib(self.available) if self.available else "no GPU" if self.device == "GPU" else "unknown"
        lines.append(f"#   {'total':<38} {gib(self.need):>10}   (this machine: {here})")
        for name, b in self.host_rows:
            lines.append(f"#   CPU RAM per node: {name:<20} {gib(b):>10}")
        return "\n".join(lines)


def plan_recipe(r, processes: int, nodes: int, gpus, ds_config: dict | None) -> tuple[Plan | None, tuple]:
    """The plan for a recipe from its model's config.json (model_config); (None, ()) when there is no
    config here or the plan cannot read its architecture. Also returns what `cheaper` needs."""
    config, source = model_config(r.model_name_or_path)
    if config is None:
        return None, ()
    try:
        shape = Shape.from_config(config)
    except (KeyError, TypeError, ZeroDivisionError, ValueError):
        return None, ()  # an architecture whose config the plan does not read: no plan, no refusal
    args = (processes, nodes, list(gpus), ds_config, shape, source)
    return estimate(r, *args), args


def gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.0f} MiB"


def estimate(r, processes: int, nodes: int, gpus: list[dict], ds_config: dict | None, shape: Shape, source: str) -> Plan:
    """The plan for recipe `r` with `processes` per node on `nodes` nodes; `gpus` from machine.gpu_info().
    A recipe for GPUs (bf16/fp16) on a machine without one is planned per GPU, against an unknown size."""
    world = processes * nodes
    half = 2 if (r.bf16 or r.fp16) else 4
    stage = zero_stage(ds_config)
    zero = (ds_config or {}).get("zero_optimization") or {}
    offload_opt = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    offload_par = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
    p = shape.params
    rows: list[tuple[str, float]] = []
    host: list[tuple[str, float]] = []
    if r.finetuning_type == "full":
        if stage in (2, 3) and half == 2:
            gpu_mem, cpu_mem = _deepspeed_states(stage, p, shape.largest_module, processes, nodes, offload_opt, offload_par)
            what = "16-bit weights (optimizer states offloaded)" if offload_opt else "weights + gradients + AdamW"
            rows.append((f"{what} (ZeRO-{stage}, DeepSpeed's estimate)", gpu_mem))
            if offload_opt or offload_par:
                host.append(("offloaded states (DeepSpeed)", cpu_mem))
        elif stage in (2, 3):  # fp32 ZeRO (DeepSpeed's estimators assume 16-bit weights)
            shard = processes * nodes
            rows.append((f"weights (fp32{', ZeRO-3 shard' if stage == 3 else ''})", 4 * p / (shard if stage == 3 else 1)))
            if stage == 3:
                rows.append(("largest module gathered (ZeRO-3)", 4 * shape.largest_module))
            rows.append((f"gradients (fp32, ZeRO-{stage} shard)", 4 * p / shard))
            (host if offload_opt else rows).append(("AdamW states (fp32 m, v" + (", offloaded)" if offload_opt else ")"),
                                                    8 * p / shard * (processes if offload_opt else 1)))
        elif stage in (0, 1):
            rows += [(f"weights ({'bf16' if r.bf16 else 'fp16' if r.fp16 else 'fp32'})", half * p),
                     ("gradients", half * p), (f"fp32 master + AdamW (ZeRO-{stage})", 12 * p / (world if stage else 1))]
        else:  # DDP: fp32 weights (AMP computes in half), fp32 gradients, AdamW m and v
            rows += [("weights (fp32; AMP computes in half)" if half == 2 else "weights (fp32)", 4 * p),
                     ("gradients (fp32)", 4 * p), ("AdamW states (fp32 m, v)", 8 * p)]
    else:
        bits = r.quantization_bit
        if bits:  # bitsandbytes quantizes the decoder's linear layers; embeddings, head and norms stay in half
            per = 0.5 + 4 / 64 * (0.25 if r.double_quantization else 1) if bits == 4 else 1.0  # + block scales
            linear = shape.quantizable
            base = (per * linear + half * (p - linear)) / (world if stage == 3 else 1)
        else:
            base = half * p / (world if stage == 3 else 1)
        kind = f"{bits}-bit, QLoRA" if bits else ("bf16/fp16" if half == 2 else "fp32")
        rows.append((f"frozen base ({kind}{', ZeRO-3 shard' if stage == 3 else ''})", base))
        if stage == 3:
            rows.append(("largest module gathered (ZeRO-3)", half * shape.largest_module))
        rows.append((f"LoRA r={r.lora_rank}: weights + gradients + AdamW (fp32)", 16 * shape.lora_params(r.lora_rank)))
    if r.stage == "dpo" and r.finetuning_type == "full":  # a frozen copy scores the reference log-probs
        rows.append((f"reference model ({'bf16/fp16' if half == 2 else 'fp32'}, frozen{', ZeRO-3 shard' if stage == 3 else ''})",
                     half * p / (world if stage == 3 else 1)))
    answers = 2 if r.stage == "dpo" and r.pref_loss != "kto" else 1  # chosen and rejected run in one batch
    tokens = answers * r.per_device_train_batch_size * (
        r.max_source_length + (r.max_target_length if r.stage in ("sft", "dpo") else 0))
    act = tokens * shape.activation_elements(r.gradient_checkpointing) * half
    if r.finetuning_type == "lora" and r.lora_dropout > 0:  # each adapted linear keeps its dropped input + mask
        kept = 1 if r.gradient_checkpointing else shape.layers  # checkpointed: recomputed a layer at a time
        act += tokens * kept * shape.lora_dropout_elements * (half + 1)
    rows.append((f"activations ({tokens} tokens{', checkpointed' if r.gradient_checkpointing else ''})", act))
    rows.append(("logits + loss (vocabulary " + f"{shape.vocab})", tokens * shape.vocab * (half + 8)))
    on_gpu = bool(gpus) or r.bf16 or r.fp16
    rows.append(("runtime (CUDA context, allocator)" if on_gpu else "runtime (torch, transformers, datasets)",
                 GPU_RUNTIME if on_gpu else CPU_RUNTIME))
    ram = host_memory()
    if on_gpu:
        sizes = [g["memory"] for g in gpus if g["memory"]]
        available = min(sizes) if sizes else None
        device = "GPU"
    else:
        available = ram / processes if ram else None
        device = "CPU worker"
    plan = Plan(rows, device, available, host, ram if host else None, source, shape, processes)
    if not on_gpu and host:  # on CPU "offloaded" states live in the same RAM: each worker's share is its own
        plan.rows += [(f"{name}, this worker's share", b / processes) for name, b in host]
        plan.host_rows, plan.host_available = [], None
    return plan


def _deepspeed_states(stage, params, largest, processes, nodes, offload_opt, offload_par) -> tuple[float, float]:
    """(per-GPU bytes, per-node CPU bytes) from DeepSpeed's own estimators."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return _deepspeed_estimate(stage, params, largest, processes, nodes, offload_opt, offload_par)


def _deepspeed_estimate(stage, params, largest, processes, nodes, offload_opt, offload_par) -> tuple[float, float]:
    import logging

    from deepspeed.utils import logger  # it reports which accelerator it picked: not the user's business here

    logger.setLevel(logging.ERROR)
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, processes, nodes, cpu_offload=offload_opt,
                                                            cpu_offload_params=offload_par, zero_init=True)
        return gpu, cpu
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(params, processes, nodes, cpu_offload=offload_opt)
    return gpu, cpu


def host_memory() -> float | None:
    """This machine's RAM in bytes (MemTotal), or None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cheaper(r, processes, nodes, gpus, ds_config, shape, source) -> list[str]:
    """The cheapest single changes that would make the plan fit, in order of what they cost in quality
    or speed."""
    from dataclasses import replace

    zero3 = {"zero_optimization": {"stage": 3}}
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    offload_all = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}
    options = [
        ("gradient_checkpointing=true", replace(r, gradient_checkpointing=True), ds_config, processes, nodes),
        ("per_device_train_batch_size=1 (raise gradient_accumulation_steps to keep the batch)",
         replace(r, per_device_train_batch_size=1), ds_config, processes, nodes),
        ("deepspeed=configs/deepspeed/zero3.json", r, zero3, processes, nodes),
        ("deepspeed=configs/deepspeed/zero3-offload.json (optimizer states in CPU RAM)", r, offload, processes, nodes),
        ("ZeRO-3 with parameters offloaded too (offload_param: cpu)", r, offload_all, processes, nodes),
        ("finetuning_type=lora", replace(r, finetuning_type="lora"), ds_config, processes, nodes),
    ]  # fmt: skip
    if gpus:
        options += [(f"{n} nodes of {processes} GPUs (ZeRO-3)", r, zero3, processes, n) for n in (2, 4, 8, 16) if n > nodes]
    out = []
    for what, rr, ds, pr, nn in options:
        if rr is r and ds is ds_config and pr == processes and nn == nodes:
            continue
        if what.startswith("gradient_checkpointing") and r.gradient_checkpointing:
            continue
        if what.startswith("per_device") and r.per_device_train_batch_size == 1:
            continue
        if what.startswith("finetuning_type") and r.finetuning_type == "lora":
            continue
        plan = estimate(rr, pr, nn, gpus, ds, shape, source)
        if plan.fits:
            out.append(f"{what} ({gib(plan.need)} per {plan.device})")
        if len(out) == 3:
            break
    return out
