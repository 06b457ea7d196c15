"""dpo: the Trainer for preference alignment, TRL's DPOTrainer (pref_loss sigmoid | ipo | hinge) or
KTOTrainer (kto), its config made from the recipe exactly as TrainingArguments are for pt/sft, so
that TRL's own defaults (bf16, gradient checkpointing, learning rate 1e-6, logging every 10 steps)
never override the recipe.

The data arrive tokenized by data.build_preferences, through the same chat template, masking and
truncation as sft; the trainers' own text preprocessing is skipped (`_prepare_dataset` hands the
columns through; test_library_contracts checks that TRL's collators read exactly these columns).

Reference model: LoRA scores it with the adapter switched off (no second copy); full fine-tuning
loads a second copy through modeling.load_model (same resolution and dtype as the policy), frozen
and in eval mode (trl#1652), which TRL wraps for DeepSpeed itself (ZeRO-3 shards it too).
"""

from __future__ import annotations

from devops_cli import modeling
from devops_cli.train.recipe import Recipe


def arguments(r: Recipe):
    """DPOConfig / KTOConfig made from the recipe as TrainingArguments are for the other stages."""
    from trl import DPOConfig, KTOConfig

    from devops_cli.train.run import training_arguments

    common = dict(beta=r.pref_beta, max_length=r.max_source_length + r.max_target_length, disable_dropout=True)
    if r.pref_loss == "kto":  # its KL term pairs each prompt with a batch neighbour's answer: a fixed order
        return training_arguments(r, KTOConfig, loss_type="kto", train_sampling_strategy="sequential", **common)
    return training_arguments(r, DPOConfig, loss_type=[r.pref_loss], **common)


def trainer(r: Recipe, args, model, train_set, eval_set, tokenizer, callbacks):
    """The TRL trainer for recipe `r` with `args` from arguments()."""
    from trl import DPOTrainer, KTOTrainer

    kto = r.pref_loss == "kto"
    if kto:  # the fixed order of KTO's batches, shuffled once here
        train_set = train_set.shuffle(seed=r.seed)
    reference = None
    if r.finetuning_type == "full":
        reference = modeling.load_model(r.model_name_or_path, model.dtype, r.trust_remote_code, r.attn_implementation)
        reference.eval()
        reference.requires_grad_(False)
    return _pretokenized(KTOTrainer if kto else DPOTrainer)(
        model=model, ref_model=reference, args=args, train_dataset=train_set, eval_dataset=eval_set,
        processing_class=tokenizer, callbacks=callbacks)


def _pretokenized(trainer_class):
    class Pretokenized(trainer_class):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if getattr(self, "calculate_KL", False):  # KTO: mismatched pairs within each batch, as TRL builds them
                def rotate(batch):
                    ids = batch["completion_ids"]
                    return {"KL_completion_ids": ids[-1:] + ids[:-1]}

                dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size,
                                      desc=f"KL completions ({dataset_name})")
            return dataset

    Pretokenized.__name__ = trainer_class.__name__
    return Pretokenized


def reward_metrics(log_history: list[dict]) -> dict:
    """The last logged preference metrics (rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies, ...) for metrics.json."""
    out: dict = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith(("rewards/", "logps/", "kl")):
                out[key] = value
    return out
