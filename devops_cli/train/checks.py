"""Everything about a recipe that can be wrong, found before any worker starts (no torch import).

`check(recipe)` raises DevopsErrors listing every problem, and returns warnings plus the checkpoint a
re-run resumes from.
"""

from __future__ import annotations

import json
from pathlib import Path

from devops_cli import dataset_info, outputs, records
from devops_cli.errors import DevopsError, DevopsErrors
from devops_cli.reading import read_json
from devops_cli.sources import hub_reachable, is_hub_id, is_qwen_v1, quantization
from devops_cli.train.recipe import RESUMABLE_CHANGES, Recipe, is_resolved, read_resolved, schema
from devops_cli.train.rundir import last_checkpoint, own_checkpoints, unstarted
from devops_cli.weights import check_model_dir

LORA_MODULES = {
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    # MoE: gate is the router; gate_proj + up_proj (both or neither) and down_proj the fused experts (train/moe.py)
    "qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "gate_proj", "up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen": ("c_attn", "c_proj", "w1", "w2"),  # Qwen v1 (remote code)
}


def check(r: Recipe) -> list[str]:
    """Everything about the recipe's model, data, DeepSpeed config and output_dir that can be wrong,
    all at once (DevopsErrors); returns the warnings. What a rerun resumes from: resume_decision."""
    errors: list[DevopsError] = []
    warnings: list[str] = []
    model_type = _model_problems(r, errors, warnings)
    if r.finetuning_type == "lora" and r.lora_target != "all" and model_type in LORA_MODULES:
        names = LORA_MODULES[model_type]
        for name in (t.strip() for t in r.lora_target.split(",")):
            if name not in names:
                errors.append(DevopsError(f"lora_target '{name}' is not a linear layer of a {model_type} model",
                                          r.where("lora_target"), f"use all, or some of {','.join(names)}"))
    _quantization_problems(r, model_type, errors)
    _moe_problems(r, errors, warnings)
    _data_problems(r, errors, warnings)
    if r.deepspeed:
        errors += check_deepspeed(Path(r.deepspeed), r)
    if errors:
        raise DevopsErrors(errors)
    return warnings


def _model_problems(r: Recipe, errors: list, warnings: list) -> str | None:
    """The model folder (or hub id) of the recipe; returns its model_type when a local config says it."""
    where = r.where("model_name_or_path")
    path = Path(r.model_name_or_path).expanduser()
    if path.exists():
        config = path / "config.json"
        if not config.is_file():
            errors.append(DevopsError(f"'{path}' has no config.json, so it is not a model directory", where))
            return None
        try:
            check_model_dir(path, where, tokenizer=True)
            found = read_json(config, where)
            model_type = found.get("model_type")
        except DevopsError as e:
            errors.append(e)
            return None
        if is_qwen_v1(found):  # Qwen v1: the workers load its native Qwen2 conversion (convert/)
            from devops_cli.convert.resolve import cache_path

            warnings.append(f"'{path}' is a Qwen v1 checkpoint: it is converted once to Qwen2 ({cache_path(path)})")
            return "qwen2"
        return model_type
    if is_hub_id(r.model_name_or_path):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(r.model_name_or_path, "config.json"), str):
            if hub_reachable():  # False when offline(); else machine.problems stops the launch
                warnings.append(f"model '{r.model_name_or_path}' is not a local directory: it will be downloaded from "
                                "the hub (if you meant a local path, it does not exist)")
        return None
    hint = "build the tiny demo model with `devops-model tiny runs/tiny`" if "tiny" in str(path) else "check the path"
    errors.append(DevopsError(f"model directory '{path}' does not exist", where, hint))
    return None


def _quantization_problems(r: Recipe, model_type: str | None, errors: list) -> None:
    """QLoRA and LoRA on quantized bases: what bitsandbytes, DeepSpeed and peft cannot do together."""
    import importlib.util

    config = Path(r.model_name_or_path).expanduser() / "config.json"
    try:
        found = read_json(config) if config.is_file() else None
    except DevopsError:  # reported by _model_problems
        found = None
    method = (quantization(found) or {}).get("quant_method")
    if method == "gptq" and r.finetuning_type == "lora" and r.lora_target == "all":
        names = ",".join(LORA_MODULES.get(model_type or "qwen2", LORA_MODULES["qwen2"]))
        errors.append(DevopsError("lora_target: all matches no layer of a GPTQ model (its linear layers are "
                                  "quantized kernels peft does not list as 'all-linear')", r.where("lora_target"),
                                  f"name the modules: lora_target: {names}"))
    if r.quantization_bit is None:
        return
    where = r.where("quantization_bit")
    if method:
        errors.append(DevopsError(f"'{r.model_name_or_path}' is already quantized ({method}): quantization_bit "
                                  "would quantize it twice", where, "drop quantization_bit, or start from the full model"))
    if importlib.util.find_spec("bitsandbytes") is None:
        errors.append(DevopsError("quantization_bit needs bitsandbytes, which is not installed", where,
                                  "pip install 'devops-model[qlora]'"))
    if r.deepspeed and r.quantization_bit == 8:
        from devops_cli.train.dsconfig import read_deepspeed, zero_stage

        if zero_stage(read_deepspeed(r)) == 3:
            errors.append(DevopsError("8-bit quantization cannot be sharded by ZeRO-3 (bitsandbytes' int8 weights "
                                      "are not partitionable)", where, "use quantization_bit: 4, or zero2.json"))


def _moe_problems(r: Recipe, errors: list, warnings: list) -> None:
    """LoRA on a mixture-of-experts model's fused experts takes no dropout (train/moe.py)."""
    from devops_cli.train import moe
    from devops_cli.train.memory import model_config

    if r.finetuning_type != "lora":
        return
    error, note = moe.lora_dropout_rule(r, model_config(r.model_name_or_path)[0])
    if error:
        errors.append(error)
    if note:
        warnings.append(note)


def _data_problems(r: Recipe, errors: list, warnings: list) -> None:
    if not r.datasets:
        errors.append(DevopsError("dataset is empty", r.where("dataset"), "name at least one dataset from dataset_info.json"))
    counts = []  # records per local dataset (after max_samples); None for a hub dataset
    for name in r.datasets:
        try:
            entry = dataset_info.resolve(name, r.dataset_dir, r.stage, r.where("dataset"))
            if entry.ranking and entry.kto != (r.pref_loss == "kto"):
                errors.append(DevopsError(
                    f"dataset '{name}' holds {'single answers with a kto_tag' if entry.kto else 'chosen/rejected pairs'}"
                    f" but pref_loss is {r.pref_loss}", r.where("pref_loss"),
                    "use pref_loss: sigmoid/ipo/hinge with pairs" if entry.kto is False else "set pref_loss: kto"))
                continue
            if "tools" in entry.explicit and r.template == "default":
                errors.append(DevopsError(f"dataset '{name}' holds tool use, which the Human/Assistant 'default' "
                                          "template cannot render", r.where("template"),
                                          "use template: auto (the model's own) or chatml (Qwen2.5's tool template)"))
            found = records.scan(entry)  # every record, streamed
            errors += found.errors
            warnings += found.warnings
            counts.append(min(found.records, r.max_samples or found.records) if entry.files else None)
            if msg := dataset_info.check_sha1(entry):
                warnings.append(msg)
        except DevopsError as e:
            errors.append(e)
    if counts and None not in counts and not errors:
        _size_problems(r, sum(counts), errors, warnings)


def _size_problems(r: Recipe, n: int, errors: list, warnings: list) -> None:
    """A data set too small for val_size or for one optimizer step, counted before launch (records:
    conversations for sft, pairs for dpo; pt packs documents into blocks, counted only once tokenized)."""
    unit = {"sft": "examples", "dpo": "preference records"}.get(r.stage)
    if unit is None or r.streaming:
        return
    held = int(r.val_size) if r.val_size >= 1 else max(1, round(r.val_size * n)) if r.val_size else 0
    if held >= n:
        errors.append(DevopsError(f"val_size {r.val_size:g} holds out {held} of the {n} {unit}: nothing is left to train on",
                                  r.where("val_size"), f"lower val_size (below {n}), or add data"))
        return
    step = r.per_device_train_batch_size * r.gradient_accumulation_steps
    if n - held < step:
        warnings.append(f"the data holds {n - held} {unit} to train on, fewer than one optimizer step takes "
                        f"({r.per_device_train_batch_size} per device x {r.gradient_accumulation_steps} accumulation "
                        f"= {step}): each step sees every example")


def check_deepspeed(path: Path, r: Recipe) -> list[DevopsError]:
    where = r.where("deepspeed")
    if not path.is_file():
        return [DevopsError(f"DeepSpeed config '{path}' not found", where, "see configs/deepspeed/")]
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return [DevopsError(f"invalid JSON: {e.msg}", f"{path}:{e.lineno}", "fix the syntax")]
    return deepspeed_problems(config, str(path), r)


def deepspeed_problems(config: dict, where: str, r: Recipe | None = None) -> list[DevopsError]:
    """Problems DeepSpeed or the HF integration would only report inside the workers."""
    out = []
    if not isinstance(config, dict):
        return [DevopsError("a DeepSpeed config must be a JSON object", where)]
    from devops_cli.train.dsconfig import zero_stage

    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        out.append(DevopsError(f"zero_optimization.stage must be 0-3, got {stage!r}", where))
    for key in ("bf16", "fp16"):
        enabled = (config.get(key) or {}).get("enabled", "auto")
        if enabled not in ("auto", True, False):
            out.append(DevopsError(f"{key}.enabled must be true, false or \"auto\"", where))
        elif r is not None and enabled != "auto" and enabled != getattr(r, key):
            out.append(DevopsError(f"{key}.enabled is {str(enabled).lower()} in the DeepSpeed config but "
                                   f"{key} is {str(getattr(r, key)).lower()} in the recipe", where,
                                   f'set "{key}": {{"enabled": "auto"}} so the recipe decides'))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = config.get(key, "auto")
        if value != "auto" and not (isinstance(value, int) and value >= 1):
            out.append(DevopsError(f"{key} must be \"auto\" or a positive integer, got {value!r}", where))
    return out


def resume_decision(r: Recipe) -> Path | None:
    """What a run does with output_dir: start (None), resume (the checkpoint), or refuse (DevopsError:
    a file, not writable, another run, foreign checkpoints the Trainer would rotate away)."""
    where = r.where("output_dir")
    out = outputs.check_name(r.output_dir, where)
    outputs.check_kind(out, where)
    outputs.not_an_input(out, inputs(r), where)
    if out.exists() and not out.is_dir():
        raise DevopsError(f"output_dir '{out}' is a file", where)
    outputs.writable_or_raise(out, where)
    if out.is_dir() and r.save_total_limit and (others := own_checkpoints(out)[1]):
        raise DevopsError(f"output_dir '{out}' holds {', '.join(p.name for p in others[:3])}, not saved by devops-model; "
                          f"with save_total_limit the Trainer would delete it", where,
                          "move it out of output_dir, or drop save_total_limit")  # fmt: skip
    if unstarted(out) or r.overwrite_output_dir:
        if r.resume_from_checkpoint not in (None, False, True):
            return _explicit_checkpoint(r)
        return None
    saved = out / "recipe.yaml"
    if not is_resolved(saved):
        raise DevopsError(f"output_dir '{out}' is not empty and was not made by devops-model", where,
                          "choose a new output_dir, or pass overwrite_output_dir=true to train into it anyway")
    before = read_resolved(saved)
    now = r.to_dict()
    # a key added to devops-model after that run was written compares as its default
    defaults = {f.name: f.default for f in schema()}
    changed = [k for k in sorted(set(before) | set(now))
               if k not in RESUMABLE_CHANGES and before.get(k, defaults.get(k)) != now.get(k)]
    if changed:
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        raise DevopsError(f"output_dir '{out}' holds another run ({diff})", where,
                          "choose a new output_dir, or pass overwrite_output_dir=true to start afresh there")
    if r.resume_from_checkpoint is False:
        return None
    if r.resume_from_checkpoint not in (None, True):
        return _explicit_checkpoint(r)
    return last_checkpoint(out)


def inputs(r: Recipe) -> list[tuple[str, str]]:
    """(what, local path) of everything a run reads, which output_dir may not be, hold or sit in."""
    model = Path(r.model_name_or_path).expanduser()
    found = [("model", str(model) if (model / "config.json").exists() else None), ("DeepSpeed config", r.deepspeed),
             ("dataset_dir", str(dataset_info.resolve_dir(r.dataset_dir)))]
    for name in r.datasets:
        try:
            entry = dataset_info.resolve(name, r.dataset_dir, r.stage, r.where("dataset"))
        except DevopsError:
            continue  # reported by check()
        found += [(f"data of '{name}'", str(f)) for f in entry.files]
    return found


def _explicit_checkpoint(r: Recipe) -> Path:
    path = Path(str(r.resume_from_checkpoint))
    if not (path / "trainer_state.json").is_file():
        raise DevopsError(f"resume_from_checkpoint '{path}' is not a complete checkpoint (no trainer_state.json)",
                          r.where("resume_from_checkpoint"), "name a checkpoint-N directory, or true for the latest")
    return path
