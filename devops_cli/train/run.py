"""pt, sft and dpo: recipe -> TrainingArguments -> model + data -> Trainer -> saved model and metrics.

Runs inside every torchrun worker. Reads top to bottom: arguments, tokenizer, data, model, train, save.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from devops_cli import modeling
from devops_cli.console import info
from devops_cli.train import data, lean, packing
from devops_cli.train.recipe import Recipe
from devops_cli.train.worker import STARTED_ENV


def process_state(r: Recipe, gpu: bool):
    """accelerate's process state, made with the backend named. Left to TrainingArguments, accelerate
    loses the backend on the DeepSpeed path when there is no CUDA and then counts one process (the
    "auto" batch sizes come out wrong), and without use_cpu a CPU torchrun job is not distributed at
    all (each worker would train alone)."""
    from accelerate import PartialState

    if r.deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    return PartialState(cpu=not gpu and not r.deepspeed, backend="nccl" if gpu else "gloo")


def training_arguments(r: Recipe, config_class=None, **more):
    """TrainingArguments (or `config_class`, a subclass such as TRL's DPOConfig, with `more` of its own
    fields) from the recipe: every value the recipe sets wins over the class's defaults."""
    import torch
    from transformers import TrainingArguments

    gpu = torch.cuda.is_available()
    process_state(r, gpu)
    kwargs = dict(
        output_dir=r.output_dir,
        per_device_train_batch_size=r.per_device_train_batch_size,
        per_device_eval_batch_size=r.per_device_eval_batch_size,
        gradient_accumulation_steps=r.gradient_accumulation_steps,
        learning_rate=r.learning_rate,
        lr_scheduler_type=r.lr_scheduler_type,
        warmup_steps=r.warmup_ratio,  # transformers 5: a float < 1 is a ratio of all steps
        num_train_epochs=r.num_train_epochs,
        max_steps=r.max_steps,
        logging_steps=r.logging_steps,
        save_steps=r.save_steps,
        save_total_limit=r.save_total_limit,
        eval_strategy="steps" if r.val_size and r.eval_steps else "no",
        eval_steps=r.eval_steps,
        bf16=r.bf16,
        fp16=r.fp16,
        deepspeed=r.deepspeed,
        report_to=[t.strip() for t in r.report_to.split(",") if t.strip()],
        seed=r.seed,
        use_cpu=not gpu and not r.deepspeed,  # device choice; DeepSpeed picks its accelerator itself
        accelerator_config={"use_configured_state": True},
        ddp_backend="nccl" if gpu else "gloo",
        dataloader_pin_memory=gpu,
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
    )
    # transformers 5.2x renamed gradient_checkpointing (the recipe keeps CodeFuse's name)
    ckpt = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    kwargs[f"{ckpt}_checkpointing"] = r.gradient_checkpointing
    kwargs[f"{ckpt}_checkpointing_kwargs"] = {"use_reentrant": False} if r.gradient_checkpointing else None
    kwargs.update(more)
    kwargs.update(r.extra)
    return (config_class or TrainingArguments)(**kwargs)


def _mark_checkpoints():
    """Each checkpoint this tool's Trainer saves gets a marker file, so that overwrite_output_dir can
    tell them from checkpoint-* folders a user keeps in output_dir (checks.own_checkpoints)."""
    from transformers import TrainerCallback

    from devops_cli.train.checks import CHECKPOINT_MARK

    class Mark(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                (folder / CHECKPOINT_MARK).write_text(json.dumps({"global_step": state.global_step}) + "\n")

    return Mark()


def peak_memory() -> dict:
    """The largest peak over all ranks: resident set size of the process, and on GPU what torch's
    allocator held."""
    import resource

    import torch

    cuda = torch.cuda.is_available()
    peaks = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,
                          torch.cuda.max_memory_allocated() if cuda else 0.0], dtype=torch.float64)  # fmt: skip
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        peaks = peaks.to("cuda") if cuda else peaks
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    out = {"peak_rss_bytes": int(peaks[0].item())}
    if cuda:
        out["peak_cuda_allocated_bytes"] = int(peaks[1].item())
    return out


def _zero3(r: Recipe) -> bool:
    """Whether the recipe's DeepSpeed config shards the weights (ZeRO stage 3)."""
    from devops_cli.train.machine import read_deepspeed, zero_stage

    return zero_stage(read_deepspeed(r)) == 3


def _collator(r: Recipe, args, model, train_set, tokenizer):
    """sft batches: padding-free when packing is on and the model passes packing.self_check on the
    run's own collator (not checked under ZeRO-3, whose sharded weights cannot run a forward before the
    Trainer wraps them, nor on a stream, whose examples are not at hand); else padded."""
    padded = packing.collator(tokenizer, False, r.attn_implementation)
    if r.stage != "sft" or not r.packing:
        return padded
    if (why := packing.unsupported(model.config)) is not None:
        info(f"sft batches: padded to the longest example, not padding-free: {why}")
        return padded
    packed = packing.collator(tokenizer, True, r.attn_implementation)
    # transformers builds the block mask from restarting position ids only when the forward has no KV
    # cache, and its models make one whenever config.use_cache is on, in training too (5.24): then the
    # examples of a packed row would see each other. Training needs no cache; run() restores the flag.
    model.config.use_cache = False
    if _zero3(r) or r.streaming:
        return packed
    from devops_cli import guard

    if not r.quantization_bit:
        model.to(args.device)  # where the Trainer puts it anyway: the check runs where training will
    why = packing.self_check(model, train_set, packed)
    if why is None:
        return packed
    guard.fallback("sft", "padding-free packing", why, "padded batches")
    return padded


class Clock:
    """Seconds of each start-up phase (metrics.json "startup"), the first counted from the start of
    the devops-model command (its interpreter, checks, and for several workers torchrun and theirs)."""

    def __init__(self):
        self.last = float(os.environ.get(STARTED_ENV) or time.time())
        self.phases: dict[str, float] = {}

    def __call__(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = round(now - self.last, 3)
        self.last = now


def run(r: Recipe) -> dict:
    clock = Clock()
    clock("launch")
    import torch
    from transformers import Trainer, set_seed

    clock("imports")
    # the recipe's seed before anything random is drawn: LoRA's initial weights come before the
    # Trainer, which seeds only when it is built (torch's own start-up seed differs every run)
    set_seed(r.seed)
    if r.stage == "dpo":
        from devops_cli.train import preference

        args = preference.arguments(r)  # first: under ZeRO-3 it makes from_pretrained shard at load time
    else:
        args = training_arguments(r)
    clock("arguments")
    tokenizer = modeling.load_tokenizer(r.model_name_or_path, r.template if r.stage != "pt" else None,
                                        r.trust_remote_code)
    callbacks = [_mark_checkpoints()]
    if r.streaming:  # nothing is read here: every worker builds the same lazy stream
        from devops_cli.train import stream

        train_set, eval_set, report = stream.build(r, tokenizer)
        info(stream.configure(args, train_set))
        callbacks.append(stream.callback(r.resume_from_checkpoint if isinstance(r.resume_from_checkpoint, str) else None))
    else:
        with args.main_process_first(desc="preparing data"):
            train_set, eval_set, report = data.build(r, tokenizer, r.preprocessing_num_workers)
    clock("data")
    info(report.lines(r.stage))

    lora = r.finetuning_type == "lora"
    dtype = modeling.torch_dtype(r.bf16, r.fp16, trainable_base=not lora, deepspeed=bool(r.deepspeed))
    quantization = None
    if r.quantization_bit:  # QLoRA: the frozen base in 4/8 bits, computing in the recipe's dtype
        zero3 = _zero3(r)
        quantization = modeling.bnb_config(r.quantization_bit, r.quantization_type, r.double_quantization, dtype, zero3)
    model = modeling.load_model(r.model_name_or_path, dtype, r.trust_remote_code, r.attn_implementation, quantization)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=r.gradient_checkpointing)
    if (pad := modeling.train_every_embedding(model)) is not None:
        info(f"the embedding of token {pad} (the config's pad_token_id) trains like every other row")
    use_cache = model.config.use_cache
    if r.gradient_checkpointing:
        model.config.use_cache = False
    if lora:
        model = modeling.add_lora(model, r.lora_rank, r.lora_alpha, r.lora_dropout, r.lora_target,
                                  r.gradient_checkpointing)
        from devops_cli.train.moe import describe_adapter

        if (line := describe_adapter(model)) is not None:
            info(line)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    kind = f"QLoRA {r.quantization_bit}-bit {r.quantization_type if r.quantization_bit == 4 else 'int8'}" \
        if r.quantization_bit else r.finetuning_type
    clock("model")
    info(f"model: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable ({dtype}, {kind})")

    if r.stage == "dpo":
        trainer = preference.trainer(r, args, model, train_set, eval_set, tokenizer, callbacks)
    else:
        collator = _collator(r, args, model, train_set, tokenizer)
        if r.stage == "sft" and (packing.is_packed(collator) or packing.unsupported(model.config) is None):
            info("sft batches: " + ("padding-free (examples packed, attention kept within each)" if packing.is_packed(collator)
                                    else "padded to the longest example"))
        trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=collator, processing_class=tokenizer, callbacks=callbacks)
    resume = r.resume_from_checkpoint if isinstance(r.resume_from_checkpoint, str) else None
    clock("trainer")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    if r.streaming and report.mix:  # the proportions the stream gave, now that it has been read
        from devops_cli.train.mix import line

        info(f"{r.stage} data {line(report.mix)}")

    (model.get_base_model() if hasattr(model, "get_base_model") else model).config.use_cache = use_cache  # as loaded
    trainer.save_model()  # ZeRO-3: gathers a full state dict (stage3_gather_16bit_weights_on_model_save)
    trainer.save_state()
    saving = time.perf_counter() - started - seconds
    metrics = dict(result.metrics)
    tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    metrics.update(attn_implementation=getattr(model.config, "_attn_implementation", None),
                   packing=r.stage == "sft" and packing.is_packed(trainer.data_collator),
                   use_liger_kernel=bool(args.use_liger_kernel), optional_libraries=lean.loaded())
    metrics.update(train_tokens=int(tokens), train_tokens_per_second=tokens / seconds if seconds else 0.0,
                   global_step=trainer.state.global_step, data=report.__dict__,
                   world_size=args.world_size, resumed_from=resume, finished_at=time.time(),
                   startup=clock.phases, startup_seconds=round(sum(clock.phases.values()), 3),
                   save_seconds=round(saving, 3))
    if r.stage == "dpo":
        from devops_cli.train.preference import reward_metrics

        metrics.update(reward_metrics(trainer.state.log_history))
    if eval_set is not None:
        ev = trainer.evaluate()
        metrics.update(ev)
        metrics["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50))
    metrics.update(peak_memory())  # what memory.py's plan is measured against
    if trainer.is_world_process_zero():
        (Path(r.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
        if r.plot_loss:
            from devops_cli.train.plot import plot_loss

            plot_loss(trainer.state.log_history, Path(r.output_dir) / "training_loss.png")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return metrics
