"""YAML recipe -> a typed Recipe, with every problem reported at once (file:line, key, fix).

No torch import here: `devops-model sft bad.yaml` must fail in a fraction of a second.
Checks that need the filesystem (model dir, datasets, DeepSpeed config, output_dir) live in
`checks.py`; this module owns the schema, parsing, type coercion and key=value overrides.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from devops_cli import __version__
from devops_cli.errors import DevopsError, DevopsErrors, did_you_mean
from devops_cli.options import allowed, coerce, describe, read_yaml

REQUIRED = "<required>"
MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")  # LLaMA-Factory's names (train/mix.py)
STAGES = ("pt", "sft", "dpo")
PREF_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo", "kto")
TEMPLATES = ("auto", "chatml", "default")
BUNDLED_DATA = "bundled"  # dataset_dir value meaning the sample data shipped in the package
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)  # fmt: skip


def _k(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Recipe:
    # --- what to train -------------------------------------------------------------------------
    stage: str = _k(REQUIRED, "pt (continued pretraining), sft (supervised fine-tuning) or dpo (preference alignment)",
                    STAGES)
    model_name_or_path: str = _k(REQUIRED, "local model directory or hub id")
    trust_remote_code: bool = _k(False, "run the model's own Python code (off unless you trust it)")
    attn_implementation: str | None = _k(None, "sdpa | eager | flash_attention_2 (default: transformers')")
    dataset: str = _k(REQUIRED, "comma list of dataset names from dataset_info.json")
    dataset_dir: str = _k(BUNDLED_DATA, "folder holding dataset_info.json ('bundled' = sample data)")
    template: str = _k("auto", "sft/dpo chat format: auto (the model's own chat template, Qwen3's thinking one "
                       "included; ChatML when the tokenizer has none), chatml (plain ChatML even when the tokenizer "
                       "ships another), default (LLaMA-Efficient-Tuning's)", TEMPLATES)
    enable_thinking: bool = _k(True, "sft/dpo on templates with a thinking switch (Qwen3): true trains answers with "
                               "their reasoning, or the empty think block when they have none; false removes "
                               "reasoning and puts the empty think block in the prompt")
    system_prompt: str | None = _k(None, "system message (chatml default: 'You are a helpful assistant.')")
    max_source_length: int = _k(1024, "pt: block size; sft: max prompt tokens per turn")
    max_target_length: int = _k(1024, "sft: max answer tokens per turn")
    max_samples: int | None = _k(None, "use at most this many examples of each dataset")
    val_size: float = _k(0.0, "held-out share (0<x<1) or count (integer >= 1) for eval loss")
    preprocessing_num_workers: int | None = _k(None, "processes for tokenization (default: 1)")
    packing: bool = _k(True, "sft: padding-free batches (examples concatenated, attention kept within each); "
                       "false pads to the longest example")
    streaming: bool = _k(False, "pt/sft: read the datasets as streams, packed on the fly (corpora bigger than RAM; "
                         "needs max_steps)")
    buffer_size: int = _k(16384, "streaming: shuffle buffer, in blocks (pt) or examples (sft)")
    mix_strategy: str = _k("concat", "several datasets: concat, interleave_under (sample by interleave_probs until "
                           "the first runs out) or interleave_over (until the last runs out)", MIX_STRATEGIES)
    interleave_probs: str | None = _k(None, "interleave: one sampling probability per dataset, e.g. 0.8,0.2 "
                                      "(default: equal turns); the run reports the proportions by tokens")
    # --- preference alignment (dpo) -------------------------------------------------------------
    pref_loss: str = _k("sigmoid", "dpo loss: sigmoid (DPO), ipo, hinge, orpo, simpo (no reference model), or kto "
                        "(a KTO dataset: answers with kto_tag)", PREF_LOSSES)
    pref_beta: float = _k(0.1, "dpo: how far the policy may move from the reference (higher = less); orpo: the "
                          "odds-ratio weight; simpo: the reward scale")
    simpo_gamma: float = _k(0.5, "simpo: the target reward margin")
    # --- how to train --------------------------------------------------------------------------
    finetuning_type: str = _k("full", "train all weights or a LoRA adapter", ("full", "lora"))
    lora_rank: int = _k(8, "LoRA rank r")
    lora_alpha: float = _k(32.0, "LoRA scaling alpha")
    lora_dropout: float = _k(0.1, "LoRA dropout")
    lora_target: str = _k("all", "'all' linear layers, or a comma list of module names (q_proj,v_proj)")
    quantization_bit: int | None = _k(None, "QLoRA: load the frozen base in 4 or 8 bits (bitsandbytes; lora only)")
    quantization_type: str = _k("nf4", "QLoRA 4-bit data type", ("nf4", "fp4"))
    double_quantization: bool = _k(True, "QLoRA 4-bit: quantize the quantization constants too")
    output_dir: str = _k(REQUIRED, "where checkpoints, logs and the final model go")
    overwrite_output_dir: bool = _k(False, "start afresh in an output_dir that holds another run")
    resume_from_checkpoint: str | bool | None = _k(None, "checkpoint dir, true/false (default: auto)")
    per_device_train_batch_size: int = _k(4, "examples per device per step")
    per_device_eval_batch_size: int = _k(4, "examples per device per eval step")
    gradient_accumulation_steps: int = _k(1, "steps accumulated per optimizer update")
    learning_rate: float = _k(5e-5, "peak learning rate")
    lr_scheduler_type: str = _k("cosine", "learning-rate schedule", SCHEDULERS)
    warmup_ratio: float = _k(0.0, "share of steps spent warming up")
    num_train_epochs: float = _k(3.0, "epochs (ignored when max_steps > 0)")
    max_steps: int = _k(-1, "total optimizer steps (overrides num_train_epochs when > 0)")
    logging_steps: int = _k(10, "log every N steps")
    save_steps: int = _k(500, "checkpoint every N steps")
    eval_steps: int | None = _k(None, "eval every N steps (needs val_size)")
    save_total_limit: int | None = _k(None, "keep at most N checkpoints")
    bf16: bool = _k(False, "bfloat16 mixed precision (recommended for Qwen on GPUs that have it)")
    fp16: bool = _k(False, "float16 mixed precision (Qwen may diverge; prefer bf16)")
    gradient_checkpointing: bool = _k(False, "trade compute for activation memory")
    deepspeed: str | None = _k(None, "DeepSpeed JSON config (configs/deepspeed/zero3.json)")
    plot_loss: bool = _k(False, "write training_loss.png into output_dir")
    report_to: str = _k("tensorboard", "comma list: tensorboard, wandb, none ...")
    seed: int = _k(42, "random seed")
    # --- launch (torchrun) ---------------------------------------------------------------------
    nproc_per_node: int | None = _k(None, "workers per node (default: visible GPUs, else 1)")
    nnodes: int | None = _k(None, "number of nodes (default: env NNODES / WORLD_SIZE, else 1)")
    node_rank: int | None = _k(None, "this node's rank (default: env NODE_RANK / RANK, else 0)")
    master_addr: str | None = _k(None, "rendezvous host (default: env MASTER_ADDR, else 127.0.0.1)")
    master_port: int | None = _k(None, "rendezvous port (default: env MASTER_PORT, else a free one)")
    force: bool = _k(False, "launch even when the memory plan says the run will not fit (--force)")
    # --- anything else transformers.TrainingArguments takes, validated ----------------------------
    extra: dict = field(default_factory=dict, metadata={"help": "pass-through TrainingArguments"})

    # where each key came from, for messages ("configs/x.yaml:12" or "override 'k=v'")
    origin: dict = field(default_factory=dict, repr=False, compare=False, metadata={"internal": True})
    source: str = field(default="", repr=False, compare=False, metadata={"internal": True})

    def where(self, key: str) -> str:
        return self.origin.get(key) or f"{self.source} (key {key})"

    @property
    def datasets(self) -> list[str]:
        return [d.strip() for d in self.dataset.split(",") if d.strip()]

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in schema() if f.name != "extra"}
        out.update(self.extra)
        return out


LAUNCH_KEYS = ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port")
# keys that may change between a run and its resumption without making it "another run"
RESUMABLE_CHANGES = {
    *LAUNCH_KEYS, "resume_from_checkpoint", "overwrite_output_dir", "max_steps", "num_train_epochs",
    "logging_steps", "save_steps", "eval_steps", "save_total_limit", "report_to", "plot_loss",
    "preprocessing_num_workers", "force",
}  # fmt: skip
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target")
PREF_KEYS = ("pref_loss", "pref_beta", "simpo_gamma")
QUANT_KEYS = ("quantization_type", "double_quantization")  # meaningful with quantization_bit only


def schema() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")]


_HINTS = typing.get_type_hints(Recipe)


# ----------------------------------------------------------------------------------------------
# TrainingArguments pass-through: field names and coarse types read from transformers' source
# ----------------------------------------------------------------------------------------------
_TA_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "dict": dict, "list": list, "None": type(None)}
_OWNED = {"local_rank", "overwrite_output_dir", "warmup_ratio", "evaluation_strategy"}


def training_argument_types() -> dict[str, tuple[type, ...] | None]:
    """{field: allowed python types} of transformers.TrainingArguments, without importing torch."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return {}
    src = Path(spec.origin).parent / "training_args.py"
    tree = ast.parse(src.read_text(encoding="utf-8"))
    out: dict[str, tuple[type, ...] | None] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    words = ast.unparse(item.annotation).replace("|", " ").replace("[", " ").split()
                    found = tuple(dict.fromkeys(_TA_TYPES[w] for w in words if w in _TA_TYPES))
                    # enum-typed fields (IntervalStrategy | str) come out as (str,); unknown -> any
                    out[item.target.id] = found or None
    return out


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise DevopsError(f"override '{text}' is not key=value", hint="e.g. learning_rate=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load(path: str | Path | None, overrides: list[str] = (), stage: str | None = None) -> Recipe:
    """Read a recipe (optional: overrides alone can make one), apply key=value overrides, and check
    every key's type and choices. Raises DevopsErrors listing every problem found."""
    values: dict[str, object] = {}
    origin: dict[str, str] = {}
    source = str(path) if path else "command line"
    if path is not None:
        data, lines = read_yaml(Path(path))
        values.update(data)
        origin.update({k: f"{path}:{n}" for k, n in lines.items()})
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
        origin[key] = f"override '{text}'"
    if stage is not None:
        values.setdefault("stage", stage)
    # a recipe.yaml this tool resolved was checked whole when it was written (and lists every key)
    return build(values, origin, source, stage, check_values=not (path is not None and is_resolved(Path(path))))


def build(values: dict, origin: dict[str, str], source: str, command: str | None = None,
          check_values: bool = True) -> Recipe:
    """Check every key of `values`; `command` is the stage the user ran (pt | sft), if any."""
    errors: list[DevopsError] = []
    if command and values.get("stage") in STAGES and values["stage"] != command:
        errors.append(DevopsError(f"the recipe says stage: {values['stage']} but you ran `devops-model {command}`",
                                  origin.get("stage"), f"run `devops-model {values['stage']}` or set stage: {command}"))
    known = {f.name: f for f in schema() if f.name != "extra"}
    ta_types = None
    kwargs: dict[str, object] = {}
    extra: dict[str, object] = {}
    valid: dict[str, object] = {}  # the keys whose type and choice are right, for value_problems
    for key, value in values.items():
        where = origin.get(key, f"{source} (key {key})")
        if not isinstance(key, str):
            errors.append(DevopsError(f"key {key!r} is not a name", where))
            continue
        if key in known:
            kinds = allowed(_HINTS[key])
            try:
                value = coerce(value, kinds)
            except ValueError:
                errors.append(DevopsError(f"{key} expects {describe(kinds)}, got {value!r}", where))
            else:
                choices = known[key].metadata.get("choices")
                if choices and value not in choices:
                    hint = _did_you_mean(str(value), choices) or f"choose one of {', '.join(choices)}"
                    errors.append(DevopsError(f"{key}: {value!r} is not one of {', '.join(choices)}", where, hint))
                else:
                    valid[key] = value
            kwargs[key] = value  # kept even when wrong: a required key is then not reported missing
            continue
        if ta_types is None:
            ta_types = training_argument_types()
        if key in ta_types and key not in _OWNED:
            kinds = ta_types[key]
            if kinds is not None:
                try:
                    value = coerce(value, kinds)
                except ValueError:
                    errors.append(DevopsError(f"{key} expects {describe(kinds)}, got {value!r}", where))
                    continue
            extra[key] = value
            continue
        hint = _did_you_mean(key, [*known, *(k for k in ta_types if k not in _OWNED)])
        errors.append(DevopsError(f"unknown key '{key}'", where,
                                  hint or "see `devops-model keys` for the recipe keys"))
    for name, f in known.items():
        if f.default == REQUIRED and name not in kwargs:
            errors.append(DevopsError(f"missing required key '{name}'", source, f"add `{name}: ...`"))
    if check_values:
        errors += value_problems(Recipe(**valid, origin=origin, source=source))
    if errors:
        raise DevopsErrors(errors)
    return Recipe(**kwargs, extra=extra, origin=origin, source=source)


def value_problems(r: Recipe) -> list[DevopsError]:
    """Ranges and combinations of values (no filesystem): checked together with the types, so one run
    of the command shows every problem."""
    errors: list[DevopsError] = []

    def bad(key: str, message: str, hint: str | None = None):
        errors.append(DevopsError(message, r.where(key), hint))

    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_source_length", "max_target_length", "logging_steps", "save_steps", "lora_rank",
                "eval_steps", "max_samples", "save_total_limit", "nproc_per_node", "nnodes",
                "preprocessing_num_workers"):  # fmt: skip
        value = getattr(r, key)
        if value is not None and value < 1:
            bad(key, f"{key} must be >= 1, got {value}")
    if r.learning_rate <= 0:
        bad("learning_rate", f"learning_rate must be > 0, got {r.learning_rate}")
    for key in ("warmup_ratio", "lora_dropout"):
        if not 0 <= getattr(r, key) < 1:
            bad(key, f"{key} must be in [0, 1), got {getattr(r, key)}")
    if r.val_size < 0 or (r.val_size >= 1 and not float(r.val_size).is_integer()):
        bad("val_size", f"val_size must be a ratio in (0, 1) or a whole count, got {r.val_size}")
    if r.max_steps == 0 or r.max_steps < -1:
        bad("max_steps", f"max_steps must be >= 1, or -1 to train num_train_epochs, got {r.max_steps}")
    elif r.max_steps == -1 and r.num_train_epochs <= 0:
        bad("num_train_epochs", f"nothing to train: num_train_epochs is {r.num_train_epochs} and max_steps is unset",
            "set num_train_epochs > 0 or max_steps >= 1")
    if r.bf16 and r.fp16:
        bad("fp16", "bf16 and fp16 are both on", "choose one (bf16 for Qwen)")
    if r.eval_steps and not r.val_size:
        bad("eval_steps", "eval_steps is set but val_size is 0, so there is nothing to evaluate", "set val_size: 0.05")
    if r.finetuning_type == "full":
        for key in LORA_KEYS:
            if key in r.origin:
                bad(key, f"{key} is set but finetuning_type is full", "set finetuning_type: lora, or drop the key")
    if r.streaming:
        if r.stage == "dpo":
            bad("streaming", "streaming is for pt and sft", "drop streaming: preference sets fit in memory")
        if r.max_steps < 1:
            bad("max_steps", "streaming: true needs max_steps (a stream has no length to count epochs by)",
                "set max_steps: N")
        if r.max_samples is not None:
            bad("max_samples", "max_samples cannot cut a stream", "drop max_samples, or set streaming: false")
        if 0 < r.val_size < 1:
            bad("val_size", f"with streaming, val_size is a count taken from the head of the stream, got {r.val_size}",
                "set val_size: 64 (blocks or examples)")
    elif "buffer_size" in r.origin:
        bad("buffer_size", "buffer_size is set but streaming is not", "set streaming: true, or drop the key")
    if r.buffer_size < 1:
        bad("buffer_size", f"buffer_size must be >= 1, got {r.buffer_size}")
    if r.interleave_probs is not None:
        if r.mix_strategy == "concat":
            bad("interleave_probs", "interleave_probs is set but mix_strategy is concat",
                "set mix_strategy: interleave_under (or interleave_over), or drop the key")
        else:
            from devops_cli.train.mix import probabilities

            try:
                probabilities(r.interleave_probs, len(r.datasets), r.where("interleave_probs"))
            except DevopsError as e:
                errors.append(e)
    if r.quantization_bit is not None:
        if r.quantization_bit not in (4, 8):
            bad("quantization_bit", f"quantization_bit must be 4 or 8, got {r.quantization_bit}",
                "4 (nf4/fp4, QLoRA) or 8 (LLM.int8)")
        if r.finetuning_type != "lora":
            bad("quantization_bit", "quantization_bit needs finetuning_type: lora (quantized weights cannot be trained)",
                "set finetuning_type: lora, or drop quantization_bit")
    else:
        for key in QUANT_KEYS:
            if key in r.origin:
                bad(key, f"{key} is set but quantization_bit is not", "set quantization_bit: 4, or drop the key")
    if r.stage == "pt" and "enable_thinking" in r.origin:
        bad("enable_thinking", "enable_thinking is set but stage is pt (pt reads plain text, no chat template)",
            "drop the key")
    if r.stage != "dpo":
        for key in PREF_KEYS:
            if key in r.origin:
                bad(key, f"{key} is set but stage is {r.stage}", "train preferences with `devops-model dpo`, or drop the key")
    if r.pref_beta <= 0:
        bad("pref_beta", f"pref_beta must be > 0, got {r.pref_beta}")
    if "simpo_gamma" in r.origin and r.pref_loss != "simpo":
        bad("simpo_gamma", f"simpo_gamma is set but pref_loss is {r.pref_loss}", "set pref_loss: simpo, or drop the key")
    if r.stage == "dpo" and r.pref_loss == "kto" and r.per_device_train_batch_size < 2:
        bad("per_device_train_batch_size", "kto needs per_device_train_batch_size >= 2 (its KL term pairs each prompt "
            "with another example's answer in the batch)", "set per_device_train_batch_size: 2 or more")
    if r.node_rank is not None and r.nnodes is not None and r.node_rank >= r.nnodes:
        bad("node_rank", f"node_rank {r.node_rank} must be below nnodes {r.nnodes}")
    if r.master_port is not None and not 0 < r.master_port < 65536:
        bad("master_port", f"master_port {r.master_port} is not a port number")
    return errors


def _did_you_mean(word: str, options) -> str | None:
    return did_you_mean(word, options)


def dump(recipe: Recipe, header: str = "") -> str:
    lines = [f"{RESOLVED_MARK} {__version__}"]
    if header:
        lines += [f"# {h}" for h in header.splitlines()]
    body = yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True, width=1000)
    return "\n".join(lines) + "\n" + body


RESOLVED_MARK = "# resolved by devops-model"


def is_resolved(path: Path) -> bool:
    """Whether `path` is a recipe.yaml that devops-model wrote (its first line says so)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(RESOLVED_MARK)
    except OSError:
        return False


def read_resolved(path: Path) -> dict:
    """The key: value mapping of a recipe.yaml that devops-model wrote into an output_dir."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}
