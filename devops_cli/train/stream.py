"""streaming: true in the Trainer: who reads the stream, and where a resumed run picks it up.

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
