"""A run that diverges does not end "done": a non-finite loss (checked every step, where the Trainer
already looks at it) or gradient norm (at each log) stops training with one line naming the step, exit
code 3 (errors.Diverged), and a model with a non-finite weight is never saved as the final model
(`check_weights`, before the save; all ranks agree before any of them stops).
"""

from __future__ import annotations

import math

from devops_cli.errors import Diverged

HINT = "lower learning_rate, add warmup_ratio or max_grad_norm, or check the data; earlier checkpoints are kept"


def watch(trainer, r) -> None:
    """Wrap the trainer's training_step to check each step's loss, and add a callback for the logs."""
    import torch
    from transformers import TrainerCallback

    step = trainer.training_step

    def checked(*args, **kwargs):
        loss = step(*args, **kwargs)
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            _close_bars(trainer)
            raise Diverged(f"training diverged: the loss is {loss.detach().float().mean().item()} at step "
                           f"{trainer.state.global_step + 1} (learning_rate {r.learning_rate:g})", hint=HINT)
        return loss

    trainer.training_step = checked

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm", "eval_loss"):
                value = (logs or {}).get(key)
                if key == "grad_norm" and r.fp16:
                    continue  # fp16's loss scaler meets inf gradients on purpose and skips those steps
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    _close_bars(trainer)
                    raise Diverged(f"training diverged: {key} is {value} at step {state.global_step} "
                                   f"(learning_rate {r.learning_rate:g})", hint=HINT)

    trainer.add_callback(Logs())


def _close_bars(trainer) -> None:
    """End the Trainer's progress bar line, so the error is a line of its own."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


def check_weights(model, step: int) -> None:
    """Raise Diverged when any weight (this rank's shard under ZeRO-3) is NaN or infinite, on every rank
    alike (a flag all-reduced), so that no rank saves and none waits for the others in a collective."""
    import torch

    bad = next((name for name, p in model.named_parameters()
                if (t := getattr(p, "ds_tensor", p)).numel() and not bool(torch.isfinite(t.detach()).all())), None)
    flag = torch.tensor([0.0 if bad is None else 1.0])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() > 0:
        where = f" ({bad})" if bad else " (on another rank)"
        raise Diverged(f"training diverged: the weights hold NaN or inf after step {step}{where}; nothing was saved "
                       "as the final model", hint=HINT)
