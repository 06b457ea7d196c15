"""dpo: the Trainer for preference alignment: TRL's DPOTrainer (pref_loss sigmoid | ipo | hinge),
KTOTrainer (kto), and its experimental ORPOTrainer (orpo) and CPOTrainer (simpo), each config made
from the recipe exactly as TrainingArguments are for pt/sft, so that TRL's own defaults (bf16,
gradient checkpointing, learning rate 1e-6, logging every 10 steps) never override the recipe.

The data arrive tokenized by data.build_preferences, through the same chat template, masking and
truncation as sft; the trainers' own text preprocessing is skipped (`_prepare_dataset` hands the
columns through; ORPO/CPO's `tokenize_row` lays them out as those trainers expect).

Reference model (sigmoid, ipo, hinge, kto; orpo and simpo need none): LoRA scores it with the
adapter switched off (no second copy); full fine-tuning loads a second copy through modeling.load_model (same resolution and dtype as the policy), frozen
and in eval mode (trl#1652), which TRL wraps for DeepSpeed itself (ZeRO-3 shards it too).
"""

from __future__ import annotations

from devops_cli import modeling
from devops_cli.train.recipe import Recipe


def arguments(r: Recipe):
    """The TRL config for pref_loss, made from the recipe as TrainingArguments are for the other stages."""
    from devops_cli.train.arguments import training_arguments

    common = dict(beta=r.pref_beta, max_length=r.max_source_length + r.max_target_length, disable_dropout=True)
    if r.pref_loss == "kto":  # its KL term pairs each prompt with a batch neighbour's answer: a fixed order
        from trl import KTOConfig

        return training_arguments(r, KTOConfig, loss_type="kto", train_sampling_strategy="sequential", **common)
    if r.pref_loss == "orpo":  # beta: ORPO's lambda, the weight of the odds-ratio term
        from trl.experimental.orpo import ORPOConfig

        return training_arguments(r, ORPOConfig, max_completion_length=r.max_target_length, **common)
    if r.pref_loss == "simpo":  # CPO's trainer with the SimPO loss and no sft term
        from trl.experimental.cpo import CPOConfig

        return training_arguments(r, CPOConfig, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=r.simpo_gamma,
                                  max_completion_length=r.max_target_length, **common)
    from trl import DPOConfig

    return training_arguments(r, DPOConfig, loss_type=[r.pref_loss], **common)


def trainer(r: Recipe, args, model, train_set, eval_set, tokenizer, callbacks):
    """The TRL trainer for recipe `r` with `args` from arguments()."""
    common = dict(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                  processing_class=tokenizer, callbacks=callbacks)
    if r.pref_loss in ("orpo", "simpo"):  # no reference model
        if r.pref_loss == "orpo":
            from trl.experimental.orpo import ORPOTrainer as Trainer
        else:
            from trl.experimental.cpo import CPOTrainer as Trainer
        return _pretokenized_pairs(Trainer)(**common)
    from trl import DPOTrainer, KTOTrainer

    if r.pref_loss == "kto":  # the fixed order of KTO's batches, shuffled once here
        common["train_dataset"] = train_set.shuffle(seed=r.seed)
    reference = None
    if r.finetuning_type == "full":
        reference = modeling.load_model(r.model_name_or_path, model.dtype, r.trust_remote_code, r.attn_implementation)
        reference.eval()
        reference.requires_grad_(False)
    return _pretokenized(KTOTrainer if r.pref_loss == "kto" else DPOTrainer)(ref_model=reference, **common)


def _pretokenized(trainer_class):
    """DPOTrainer / KTOTrainer taking data.build_preferences' columns as they are."""

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


def _pretokenized_pairs(trainer_class):
    """ORPOTrainer / CPOTrainer (TRL's older data layout): each row's prompt, prompt + chosen and
    prompt + rejected, the prompt part labelled -100."""
    from devops_cli.train.data import IGNORE

    class Pretokenized(trainer_class):
        def tokenize_row(self, feature, model=None):
            prompt = feature["prompt_ids"]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = feature[f"{side}_ids"]
                row[f"{side}_input_ids"] = prompt + answer
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{side}_labels"] = [IGNORE] * len(prompt) + answer
            return row

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
