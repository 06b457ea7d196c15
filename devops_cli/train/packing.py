"""Padding-free sft batches (`packing: true`, the default): the examples of a batch are concatenated
into one row with position ids restarting at every example (transformers' DataCollatorWithFlattening),
so no compute goes to padding. Attention never crosses examples: sdpa and eager get a block-causal
mask that transformers builds from the restarting position ids, flash-attention its varlen lengths.

A run checks this at start-up on its own model (`self_check`): per-token losses of three examples
packed together against the same examples one at a time, measured against how far they drift when
the examples do see each other; a model that does not honour the position ids falls back to padded
batches with a warning.
"""

from __future__ import annotations

from devops_cli.train.data import IGNORE


def collator(tokenizer, packed: bool, attn_implementation: str | None):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if not packed:
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, padding=True)
    flash = bool(attn_implementation) and attn_implementation.startswith("flash_attention")
    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE, return_flash_attn_kwargs=flash)


def per_token_losses(model, batch: dict) -> list:
    """Cross-entropy of every labelled next token, in order (the model's own shift)."""
    import torch

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    shifted = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, reduction="none",
                                               ignore_index=IGNORE)
    return losses[shifted != IGNORE]


def compare(model, examples: list[dict], flash: bool = False) -> tuple[float, float]:
    """(max |packed - one by one|, max |seen-each-other - one by one|) over the labelled tokens of
    `examples` ({input_ids, labels}); the second is the drift the block mask must prevent."""
    import torch
    from transformers import DataCollatorWithFlattening

    device = next(model.parameters()).device
    flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE, return_flash_attn_kwargs=flash)
    with torch.no_grad():
        alone = torch.cat([per_token_losses(model, {k: torch.tensor([e[k]], device=device) for k in ("input_ids", "labels")})
                           for e in examples])
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in flat(examples).items()}
        packed = per_token_losses(model, batch)
        crossed = per_token_losses(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    return float((packed - alone).abs().max()), float((crossed - alone).abs().max())


def self_check(model, train_set, attn_implementation: str | None) -> str | None:
    """None when packed losses match one-by-one losses on this model; else why not."""
    head = train_set.select(range(min(256, len(train_set))))
    lengths = [(len(x), i) for i, x in enumerate(head["input_ids"])]
    picked = [head[i] for _, i in sorted(lengths)[len(lengths) // 2 :][:3]]  # three mid-length examples
    if len(picked) < 2:
        return None  # nothing to pack together
    examples = [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in picked]
    import torch

    # training mode with dropout off: in eval mode bitsandbytes repacks 4-bit weights for CPU inference
    # at the first forward, and its training path then cannot use them
    was_training = model.training
    model.train()
    dropouts = [(m, "p", m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    dropouts += [(m, "attention_dropout", m.attention_dropout) for m in model.modules()
                 if isinstance(getattr(m, "attention_dropout", None), float)]
    for m, name, _ in dropouts:
        setattr(m, name, 0.0)
    try:
        flash = bool(attn_implementation) and attn_implementation.startswith("flash_attention")
        gap, drift = compare(model, examples, flash)
    except Exception as e:  # noqa: BLE001 - a model that cannot take the flattened batch at all
        from devops_cli.errors import first_line

        return f"the packed forward failed: {type(e).__name__}: {first_line(e)}"
    finally:
        for m, name, value in dropouts:
            setattr(m, name, value)
        model.train(was_training)
    if gap <= 1e-4 or gap <= 0.05 * drift:
        return None
    return f"packed losses differ from one-by-one by {gap:.2e} (examples that see each other: {drift:.2e})"
