"""streaming: true — the data as a stream (`build`), who reads it, and where a resumed run picks it up.

- Reading: with at least as many files (shards) as workers, each worker reads its own files
  (accelerate shards a datasets IterableDataset by its files); with fewer, rank 0 reads the stream
  and dispatches each batch to the others. The run says which.
- Resuming: every checkpoint holds each worker's stream position (`IterableDataset.state_dict()`,
  stream_state_rank{R}.json); a resumed run loads it into its stream before the first batch, so it
  goes on from there instead of re-reading from the start. Not bit-exact: the shuffle buffer is
  refilled from the restored position, and the data loader had fetched one batch ahead of the
  saved step, so that batch is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from devops_cli import dataset_info
from devops_cli.train import data
from devops_cli.train.recipe import Recipe

PACK_BATCH = 1000  # documents tokenized and packed at a time: with the shuffle buffer, what memory holds


def build(recipe: Recipe, tokenizer):
    """-> (train IterableDataset, eval IterableDataset or None, DataReport with nothing counted yet).

    pt blocks are packed as data.pack packs them, PACK_BATCH documents at a time (in memory: 10,000)
    and each file on its own (a partial block is dropped at the end of each); sft examples are encoded as
    data.build_sft encodes them. Memory stays bounded by the packing batch and the shuffle buffer
    (`buffer_size`), whatever the corpus size. The eval set is the first `val_size` blocks (examples)
    of the stream, which training then skips; both are split the same way when the workers shard
    the stream, so they never overlap."""
    from devops_cli.train import mix

    eos = tokenizer.eos_token_id
    renderer = data.make_renderer(tokenizer, recipe) if recipe.stage == "sft" else None
    parts = []
    for name in recipe.datasets:
        entry = dataset_info.resolve(name, recipe.dataset_dir, recipe.stage, recipe.where("dataset"))
        ds = data.load_raw(entry, None, streaming=True)
        if recipe.stage == "pt":
            parts.append(ds.map(data._to_text(entry), batched=True).select_columns(["text"]))
        else:
            parts.append(ds.map(data.to_messages(entry), batched=True, with_indices=True, remove_columns=ds.column_names,
                                features=data.messages_features()))
    stream = mix.combine(parts, recipe.datasets, recipe.mix_strategy, recipe.interleave_probs, recipe.seed,
                         recipe.where("interleave_probs"))
    report = data.DataReport()  # its mix fills in as the stream is read (several datasets)
    block = recipe.max_source_length

    def pack_batch(batch):
        import numpy as np

        ids_list = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        if mix.SOURCE in batch:
            mix.count(report.mix, recipe.datasets, batch[mix.SOURCE], [len(ids) + 1 for ids in ids_list])
        flat = [t for ids in ids_list for t in ids + [eos]]
        # int64 rows (2 KB a block, a tenth of a list of Python ints), labels the same row: the shuffle buffer's size
        blocks = list(np.asarray(flat[: len(flat) // block * block], dtype=np.int64).reshape(-1, block))
        return {"input_ids": blocks, "labels": blocks}

    def encode_batch(batch):
        out = {"input_ids": [], "labels": []}
        for i, messages in enumerate(batch["messages"]):
            try:
                examples = data.encode_examples(renderer, messages, recipe.max_source_length, recipe.max_target_length,
                                                batch["tools"][i])
            except ValueError:
                continue
            for input_ids, labels, _ in examples:
                if any(t != data.IGNORE for t in labels):
                    out["input_ids"].append(input_ids)
                    out["labels"].append(labels)
                    if mix.SOURCE in batch:
                        mix.count(report.mix, recipe.datasets, [batch[mix.SOURCE][i]], [len(input_ids)])
        return out

    tag = [mix.SOURCE] if len(parts) > 1 else []
    if recipe.stage == "pt":
        stream = stream.map(pack_batch, batched=True, batch_size=PACK_BATCH, remove_columns=["text", *tag])
    else:
        stream = stream.map(encode_batch, batched=True, batch_size=1000, remove_columns=["messages", "tools", *tag])
    eval_set = None
    n = int(recipe.val_size)
    if n:
        eval_set, stream = stream.take(n), stream.skip(n)
    train = stream.shuffle(seed=recipe.seed, buffer_size=recipe.buffer_size)
    return train, eval_set, report


def configure(args, train_set) -> str:
    """Chooses how the workers read the stream (accelerate's dispatch_batches) and says it."""
    world, shards = args.world_size, train_set.num_shards
    args.ignore_data_skip = True  # the stream position is restored (StreamState), not re-read and skipped
    if world == 1:
        return f"streaming: one worker reads {shards} file(s)"
    own = shards >= world
    args.accelerator_config.dispatch_batches = not own
    if own:
        return f"streaming: each of the {world} workers reads its own file(s) ({shards} shards)"
    return f"streaming: rank 0 reads the stream and dispatches batches ({shards} file(s) < {world} workers)"


def _exhausted(dataset, position: dict) -> bool:
    """Whether the stream has nothing left after `position` (a copy is read: one shuffle buffer)."""
    import copy

    probe = copy.deepcopy(dataset)
    probe.load_state_dict(position)
    return next(iter(probe), None) is None


def state_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / f"stream_state_rank{rank}.json"


def callback(resume_from: str | None):
    from transformers import TrainerCallback

    from devops_cli.console import info, warn

    class StreamState(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            if not resume_from or train_dataloader is None:
                return
            saved = state_file(Path(resume_from), args.process_index)
            dataset = getattr(train_dataloader, "dataset", None)
            if not saved.is_file():
                if dataset is not None and hasattr(dataset, "load_state_dict") and args.process_index == 0:
                    warn(f"{resume_from} holds no stream position: the stream starts again from its head")
                return
            if hasattr(dataset, "load_state_dict"):
                position = json.loads(saved.read_text())
                if _exhausted(dataset, position):  # saved at the very end: the next pass starts at the head
                    info(f"streaming: rank {args.process_index}'s stream ended at {Path(resume_from).name}; "
                         "it starts its next pass")
                    return
                dataset.load_state_dict(position)
                if args.process_index == 0:
                    info(f"streaming: resumed each worker's stream at its position in {Path(resume_from).name}")

        def on_save(self, args, state, control, train_dataloader=None, **kwargs):
            dataset = getattr(train_dataloader, "dataset", None)
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if dataset is not None and hasattr(dataset, "state_dict") and folder.is_dir():
                state_file(folder, args.process_index).write_text(json.dumps(dataset.state_dict()) + "\n")

    return StreamState()
