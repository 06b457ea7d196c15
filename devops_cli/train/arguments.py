"""TrainingArguments (and TRL's configs) from a recipe, and the process group they run in: one rule for
pt, sft and dpo. No torch import at module level."""

from __future__ import annotations

import os

from devops_cli.train.recipe import Recipe


def process_state(r: Recipe, gpu: bool):
    """accelerate's process state, made with the backend named. Left to TrainingArguments, accelerate
    loses the backend on the DeepSpeed path when there is no CUDA and then counts one process (the
    "auto" batch sizes come out wrong), and without use_cpu a CPU torchrun job is not distributed at
    all (each worker would train alone)."""
    from accelerate import PartialState

    from devops_cli.train import rendezvous

    # several workers: they meet within rdzv_timeout (naming who did not come) before accelerate and
    # DeepSpeed take the process group as it is; collectives then get ddp_timeout
    rendezvous.join(r.rdzv_timeout, "nccl" if gpu else "gloo", int(r.extra.get("ddp_timeout", 1800)))
    if r.deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    return PartialState(cpu=not gpu and not r.deepspeed, backend="nccl" if gpu else "gloo")


def end_process_group() -> None:
    """The process group goes, and with it accelerate's process-wide state, which remembers it. Called when
    a worker is done: in the command's own process (launch.run_here), a second run would otherwise wrap
    its model in DDP over the destroyed group and crash; in a torchrun worker, the group's threads are
    stopped before the interpreter tears down (a worker once aborted there, after its run had finished)."""
    import sys

    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


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
