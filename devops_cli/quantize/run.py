"""`devops-model quantize`: GPTQ int4/int8 calibrated on the user's own data, verified before it is saved.

    options -> calibration texts (dataset name | jsonl/json/txt | bundled corpus) -> token blocks,
    every few blocks held out for perplexity -> model (a LoRA adapter is merged first) -> perplexity
    before -> transformer blocks and their linear groups found from the model -> GPTQ (optimum's
    GPTQQuantizer on gptqmodel) -> saved into a temp dir beside --output -> reloaded with
    AutoModelForCausalLM, perplexity after, a few generated tokens, sizes -> renamed into place.

Checks the user can fail run before torch is imported (the too-short check needs the tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from devops_cli import lifeline
from devops_cli.console import import_gptq_quietly, info, warn
from devops_cli.errors import DevopsError
from devops_cli.options import ModelOptions, opt
from devops_cli.outputs import disk_full, new_output_dir, replace_dir
from devops_cli.quantize import gptq
from devops_cli.quantize.calibration import open_source, token_blocks
from devops_cli.sources import check_model_arg
from devops_cli.weights import check_adapter_dir, check_model_dir

BITS = (4, 8)
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # what gptqmodel's QuantizeConfig accepts
DTYPES = ("auto", "float16", "bfloat16")  # auto: float16, what GPTQ kernels compute in
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class QuantizeOptions(ModelOptions):
    """The flags of `devops-model quantize` and the keys of a quantize recipe (options.command builds both);
    the model options are ModelOptions' (--adapter, or --model naming an adapter dir: merged first)."""

    output: str | None = opt(None, "directory for the quantized checkpoint", "-o")
    bits: int = opt(4, "4 | 8")
    group_size: int = opt(128, "columns per scale; -1 = one per row")
    desc_act: bool = opt(False, "act-order: columns by activation size (slower kernels)")
    damp_percent: float = opt(0.1, "GPTQ dampening: share of the mean Hessian diagonal added to it")
    calib: str | None = opt(None, "dataset name(s) from dataset_info.json, or a .jsonl/.json/.txt file",
                            shown="the bundled DevOps corpus")
    calib_field: str | None = opt(None, "jsonl/json text field", shown="text, messages or instruction/output")
    calib_samples: int = opt(128, "calibration samples")
    calib_seq_len: int = opt(1024, "tokens per sample")
    eval_samples: int = opt(16, "held-out blocks for perplexity before/after")
    dataset_dir: str = opt("bundled", "folder with dataset_info.json for --calib names")
    overwrite: bool = opt(False, "replace a non-empty --output (only once the new one is verified)")


def check(o: QuantizeOptions, where=lambda flag: flag) -> None:
    """Flag checks before anything heavy loads; `where(flag)` names the flag or its recipe line."""
    if not o.model and not o.adapter:
        raise DevopsError("no model given", where("--model"), "pass --model PATH (a model), or --adapter LORA_DIR")
    if not o.output:
        raise DevopsError("no output directory given", where("--output"), "pass --output DIR")
    if o.bits not in BITS:
        raise DevopsError(f"--bits {o.bits} is not supported", where("--bits"), "choose 4 or 8")
    if o.group_size not in GROUP_SIZES:
        raise DevopsError(f"--group-size {o.group_size} is not one GPTQ kernels take", where("--group-size"),
                          f"use 128 (the usual), -1 (one group per row), or {', '.join(map(str, GROUP_SIZES[1:]))}")
    if not 0 < o.damp_percent < 1:
        raise DevopsError(f"--damp-percent {o.damp_percent} must be between 0 and 1", where("--damp-percent"),
                          "use 0.01-0.1 (0.1 is the usual)")
    for flag, value, low in (("--calib-samples", o.calib_samples, 1), ("--calib-seq-len", o.calib_seq_len, 16),
                             ("--eval-samples", o.eval_samples, 1)):
        if value < low:
            raise DevopsError(f"{flag} {value} must be >= {low}", where(flag))
    if o.dtype not in DTYPES:
        raise DevopsError(f"'{o.dtype}' is not a dtype for GPTQ", where("--dtype"),
                          f"choose {' | '.join(DTYPES)} (the unquantized parts; auto = float16)")
    if o.device != "auto" and o.device != "cpu" and not o.device.startswith("cuda"):
        raise DevopsError(f"'{o.device}' is not a device for GPTQ", where("--device"), "choose auto | cpu | cuda | cuda:N")
    out = Path(o.output)
    if o.adapter:
        check_adapter_dir(Path(o.adapter), where("--adapter"))
    if o.adapter and not o.model:
        _check_architecture(Path(o.adapter), where("--adapter"))
        new_output_dir(out, o.overwrite, where("--output"), inputs=inputs(o))
        return
    src = Path(o.model)
    if src.exists() and not (src / "config.json").is_file() and not (src / "adapter_config.json").is_file():
        raise DevopsError(f"'{o.model}' has neither config.json nor adapter_config.json", where("--model"),
                          "pass a model directory (save_pretrained) or a LoRA adapter directory")
    if not src.exists():
        check_model_arg(o.model, where("--model"))
    if (src / "adapter_config.json").is_file():
        check_adapter_dir(src, where("--model"))
    elif (src / "config.json").is_file():
        check_model_dir(src, where("--model"), tokenizer=True)
    _check_architecture(src, where("--model"))
    new_output_dir(out, o.overwrite, where("--output"), inputs=inputs(o))


def inputs(o: QuantizeOptions) -> list[tuple[str, str | None]]:
    """What quantize reads, which --output may not be, hold or sit in: the model (and an adapter's base)
    and the calibration file or dataset folder."""
    model, adapter = sources(o)
    found = [("model", model)] + ([("adapter", str(adapter))] if adapter else [])
    if o.calib and o.calib != "bundled":
        found.append(("calibration file", o.calib) if Path(o.calib).exists() else ("--dataset-dir", o.dataset_dir))
    return found


def sources(o: QuantizeOptions) -> tuple[str, Path | None]:
    """(the model to load, the adapter merged into it first): --adapter onto --model (default: the
    adapter's base), or --model naming an adapter directory, onto its base."""
    from devops_cli.modeling import adapter_base

    if o.adapter:
        return o.model or adapter_base(Path(o.adapter)), Path(o.adapter)
    if (Path(o.model) / "adapter_config.json").is_file():
        return adapter_base(Path(o.model)), Path(o.model)
    return o.model, None


def _check_architecture(src: Path, where: str) -> None:
    """Refuse, from config.json (the adapter's base's for an adapter), a model GPTQ here cannot quantize."""
    config = src / "config.json"
    if (src / "adapter_config.json").is_file():
        base = json.loads((src / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        config = Path(base or "") / "config.json"
    if not config.is_file():
        return  # a hub id: checked once the model has loaded (gptq.coverage)
    refusal = gptq.unsupported(json.loads(config.read_text(encoding="utf-8")))
    if refusal:
        raise DevopsError(refusal[0], where, refusal[1])


def run(o: QuantizeOptions, where=lambda flag: flag) -> dict:
    """Quantize, verify, save. Returns the report written to OUTPUT/quantize.json."""
    check(o, where)
    source = open_source(o.calib, o.calib_field, o.dataset_dir, where("--calib"))  # file checks, no torch
    out = Path(o.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.quantize-{lifeline.tag()}"  # beside the output: the rename stays on one disk
    for old in lifeline.stale(out.parent, f".{out.name}.quantize-"):  # a run killed -9 could not remove its own
        shutil.rmtree(old, ignore_errors=True)
        info(f"removed {old.name}: the scratch folder of an interrupted quantize (its process is gone)")
    t_start = time.perf_counter()
    try:
        return _run(o, source, out, scratch, t_start)
    except Exception as e:  # a full disk while saving: one line; the scratch folder goes below
        if (full := disk_full(e, out, where("--output"))) is not None:
            raise full from None
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # a failure midway leaves nothing behind


def _run(o: QuantizeOptions, source, out: Path, scratch: Path, t_start: float) -> dict:
    missing = import_gptq_quietly()
    import torch

    from devops_cli.modeling import load_model, load_tokenizer, merge_adapter, tokenizer_source

    model_path, adapter = sources(o)
    tokenizer = load_tokenizer(tokenizer_source(model_path, adapter), trust_remote_code=o.trust_remote_code)
    blocks = token_blocks(source, tokenizer, o.calib_seq_len, o.calib_samples, o.eval_samples)
    if missing:  # after the checks of the user's data, so those come first
        raise DevopsError(f"GPTQ needs gptqmodel and optimum ({missing} is missing)",
                          hint="pip install 'devops-model[quantize]' (CPU machines: with constraints.txt)")
    if len(blocks.calib) < o.calib_samples:
        warn(f"{source.name} holds {len(blocks.calib)} calibration samples of {o.calib_seq_len} tokens "
             f"(asked for {o.calib_samples}); using them all")
    info(f"calibration: {len(blocks.calib)} samples x {o.calib_seq_len} tokens from {source.name}; "
         f"{len(blocks.held)} blocks held out for perplexity")
    device = _device(o.device)
    dtype = torch.bfloat16 if o.dtype == "bfloat16" else torch.float16
    if adapter is not None:
        info(f"merging LoRA adapter {adapter} into {model_path} …")
        model_path = str(merge_adapter(adapter, scratch / "merged", model_path, o.trust_remote_code))

    t_load = time.perf_counter()
    model = load_model(model_path, dtype, o.trust_remote_code).to(device).eval()
    block_name, groups = gptq.find_blocks(model, blocks.calib[0][:16], device)
    n_blocks = len(model.get_submodule(block_name))
    quantized_params, decoder_params = gptq.coverage(model, block_name, groups)
    linear_names = [f"{block_name}.{i}.{name}" for i in range(n_blocks) for group in groups for name in group]
    fp16_linear = sum(_fp16_bytes(model.get_submodule(n)) for n in linear_names)
    fp16_model = sum(p.numel() for p in model.parameters()) * 2
    ppl_before = gptq.perplexity(model, blocks.held, device)
    info(f"blocks: {block_name} x {n_blocks}; linears per block, by shared input: "
         f"{' | '.join(' '.join(n.rsplit('.', 1)[-1] for n in g) for g in groups)}")
    info(f"perplexity before: {ppl_before:.4f}")

    t_quant = time.perf_counter()
    quantizer = gptq._quantize(model, tokenizer, o, blocks.calib, block_name, groups, device)
    seconds_quant = time.perf_counter() - t_quant

    probe = blocks.held[0]
    quantized = gptq._last_logits(model, probe, device)
    staged = scratch / "out"
    gptq._save(quantizer, model, staged)
    tokenizer.save_pretrained(str(staged))
    del model
    t_verify = time.perf_counter()
    reloaded = load_model(str(staged), dtype, o.trust_remote_code, device=device).to(device).eval()
    round_trip = gptq._check_round_trip(quantized, gptq._last_logits(reloaded, probe, device), dtype)
    ppl_after = gptq.perplexity(reloaded, blocks.held, device)
    sample = gptq._generate(reloaded, tokenizer, blocks.held[0][:16], device)
    seconds_verify = time.perf_counter() - t_verify

    disk_before = _weights_bytes(Path(model_path)) if Path(model_path).is_dir() else None
    tensors = _safetensors_bytes(staged)
    linear_after = sum(b for name, b in tensors.items() if any(name.startswith(n + ".") for n in linear_names))
    report = {
        "model": o.model, "adapter": adapter and str(adapter), "output": str(out), "options": asdict(o),
        "calibration": {"source": source.name, "samples": len(blocks.calib), "seq_len": o.calib_seq_len,
                        "tokens_read": blocks.tokens_read},
        "block_name": block_name, "blocks": n_blocks, "linear_groups": groups, "quantized_linears": len(linear_names),
        "decoder_weights": {"quantized": quantized_params, "total": decoder_params,
                            "fraction_quantized": quantized_params / decoder_params},
        "perplexity": {"before": ppl_before, "after": ppl_after, "increase": ppl_after / ppl_before - 1,
                       "held_out_blocks": len(blocks.held), "held_out_tokens": len(blocks.held) * o.calib_seq_len},
        "bytes": {"linear_fp16": fp16_linear, "linear_quantized": linear_after,
                  "linear_ratio": linear_after / fp16_linear, "model_fp16": fp16_model,
                  "weights_on_disk_before": disk_before, "weights_on_disk_after": sum(tensors.values()),
                  "checkpoint_ratio_vs_fp16": sum(tensors.values()) / fp16_model},
        "seconds": {"load_and_measure": t_quant - t_load, "quantize": seconds_quant, "verify": seconds_verify,
                    "total": time.perf_counter() - t_start, "per_block": seconds_quant / n_blocks},
        "round_trip_max_logit_diff": round_trip, "sample_generation": sample, "device": str(device), "dtype": str(dtype)[6:], "versions": _versions(),
    }  # fmt: skip
    (staged / "quantize.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _replace(staged, out, scratch)
    return report


# ----------------------------------------------------------------------------------------------
# Environment, sizes, files
# ----------------------------------------------------------------------------------------------
def _device(name: str):
    """modeling.resolve_device (GPTQ runs on cuda or cpu), with gptqmodel's CPU pool sized."""
    from devops_cli.modeling import resolve_device

    device = resolve_device(name)
    if device.type == "mps":
        device = resolve_device("cpu")  # gptqmodel has no MPS kernels
    if device.type == "cpu":
        # gptqmodel sizes its CPU worker pool from this; on a 2-core machine it fails without it
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    return device


def _fp16_bytes(linear) -> int:
    return (linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)) * 2


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES)


def _safetensors_bytes(path: Path) -> dict[str, int]:
    """{tensor name: bytes} read from the safetensors headers (no tensor is loaded)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                out[name] = end - start
    return out


def _replace(staged: Path, out: Path, scratch: Path) -> None:
    """Move the verified checkpoint into place; an old output (--overwrite) goes only once the new one is there."""
    replace_dir(staged, out)


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "optimum", "gptqmodel")}
