"""Padding-free sft batches (`packing: true`, the default): the examples of a batch are concatenated
with position ids restarting at every example, so no compute goes to padding, and attention never
crosses examples: transformers builds a block-causal mask from the restarting position ids for sdpa and
eager, and flash-attention gets its varlen lengths. No mask is made here.

Two layouts, one per attention kind:
- flash-attention (varlen): the whole batch in one row (transformers' DataCollatorWithFlattening); its
  kernel works per example, so one row costs nothing extra.
- sdpa / eager: a dense mask over a row costs row length squared, so one row of all the batch's
  examples would spend more on attention than padding does. The examples go into rows no longer than
  the batch's longest example (first-fit decreasing), each row's remainder one padding segment of its
  own (position ids from 0, labels ignored, never seen by a real token): attention per row, next to
  no padding.

A run checks this at start-up on its own model (`self_check`): per-token losses of three examples
packed together against the same examples one at a time, measured against how far they drift when
the examples do see each other; a model that does not honour the position ids falls back to padded
batches with a warning.
"""

from __future__ import annotations

from devops_cli.train.data import IGNORE


def _flash(attn_implementation: str | None) -> bool:
    return bool(attn_implementation) and attn_implementation.startswith("flash_attention")


class PackedRows:
    """sdpa/eager padding-free batches: {input_ids, labels, position_ids}, rows of at most the longest
    example, first-fit decreasing. Each example's first label is ignored, as in
    DataCollatorWithFlattening: it would be predicted from the previous example's last token."""

    def __init__(self, pad_token_id: int, capacity: int | None = None):
        self.pad = pad_token_id
        self.capacity = capacity  # tokens per row; None: the batch's longest example

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the examples in each row."""
        capacity = max(self.capacity or 0, *lengths)
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
            if row is None:
                rows.append([])
                room.append(capacity)
                row = len(rows) - 1
            rows[row].append(i)
            room[row] -= lengths[i]
        return rows

    def __call__(self, features: list[dict]) -> dict:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        rows = self.rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        ids, labels, positions = [], [], []
        for row in rows:
            row_ids, row_labels, row_positions = [], [], []
            for i in row:
                f = features[i]
                row_ids += list(f["input_ids"])
                row_labels += [IGNORE] + list(f["labels"])[1:]
                row_positions += range(lengths[i])
            rest = width - len(row_ids)
            ids.append(row_ids + [self.pad] * rest)
            labels.append(row_labels + [IGNORE] * rest)
            positions.append(row_positions + list(range(rest)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


def collator(tokenizer, packed: bool, attn_implementation: str | None):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if not packed:
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, padding=True)
    if _flash(attn_implementation):
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE, return_flash_attn_kwargs=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PackedRows(pad)


def is_packed(collator) -> bool:
    from transformers import DataCollatorWithFlattening

    return isinstance(collator, (PackedRows, DataCollatorWithFlattening))


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


def compare(model, examples: list[dict], pack=None) -> tuple[float, float]:
    """(max |packed - one by one|, max |seen-each-other - one by one|) over the labelled tokens of
    `examples` ({input_ids, labels}), packed by `pack` (a collator above; default: all in one row);
    the second is the drift the block mask must prevent, measured on the same batch without its
    position ids. Tokens are compared example by example, whatever the row order."""
    import torch
    from transformers import DataCollatorWithFlattening

    device = next(model.parameters()).device
    pack = pack or DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)
    with torch.no_grad():
        alone = [per_token_losses(model, {k: torch.tensor([e[k]], device=device) for k in ("input_ids", "labels")})
                 for e in examples]
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in pack(examples).items()}
        packed = per_token_losses(model, batch)
        crossed = per_token_losses(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    order = [i for row in pack.rows([len(e["input_ids"]) for e in examples]) for i in row] \
        if isinstance(pack, PackedRows) else range(len(examples))
    alone = torch.cat([alone[i] for i in order])
    return float((packed - alone).abs().max()), float((crossed - alone).abs().max())


def unsupported(config) -> str | None:
    """Why padding-free rows cannot hold several examples of this model, whatever the self-check measures
    (None: they can). Linear-attention layers (Qwen3.5's Gated DeltaNet) run a recurrent state and a
    causal convolution along the row; transformers resets them only on flash-attention's cu_seqlens, so
    one example's state would flow into the next (measured: 2.5e-3 in fp32 on the tiny Qwen3.5, a
    gap the self-check's relative bound let through)."""
    config = getattr(config, "text_config", None) or config
    if "linear_attention" in (getattr(config, "layer_types", None) or []):
        return "its linear-attention layers would carry their state from one packed example into the next"
    return None


def self_check(model, train_set, pack) -> str | None:
    """None when losses of examples packed by `pack` (the run's collator) match one-by-one losses on
    this model; else why not."""
    head = train_set.select(range(min(256, len(train_set))))
    lengths = [(len(x), i) for i, x in enumerate(head["input_ids"])]
    picked = [head[i] for _, i in sorted(lengths)[len(lengths) // 2 :][:3]]  # three mid-length examples
    examples = [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in picked]
    if isinstance(pack, PackedRows):  # rows wide enough that the two shorter examples share one, and
        a, b, c = sorted(len(e["input_ids"]) for e in examples)  # one row ends in a padding segment
        pack = PackedRows(pack.pad, capacity=max(c, a + b))
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
        gap, drift = compare(model, examples, pack)
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
