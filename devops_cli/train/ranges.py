"""The ranges the libraries under a recipe accept, checked with the types before anything launches (no
filesystem, no torch): a value outside them would crash a worker after the model loaded, or train to
NaN and end "done". Floats are finite by the types' own rule (options.coerce); here: signs, bounds and
the integer limits numpy, torch and the Trainer take. recipe.value_problems adds these to its own.
"""

from __future__ import annotations

from devops_cli.errors import DevopsError
from devops_cli.options import SEED_MAX

INT_MAX = 2**31 - 1  # a C int: what torch, the dataloader and the Trainer's counters take
MAX_ACCUMULATION = 65536  # the Trainer prefetches a step's micro-batches into memory before the step

# recipe key or TrainingArguments pass-through -> (low, high, low inclusive, high inclusive, what it is)
FLOAT_RANGES = {
    "lora_alpha": (0.0, None, False, True, "LoRA's scaling numerator"),
    "pref_beta": (0.0, None, False, True, "the preference loss's temperature"),
    "simpo_gamma": (0.0, None, True, True, "SimPO's target reward margin"),
    "weight_decay": (0.0, None, True, True, "AdamW's decay"),
    "max_grad_norm": (0.0, None, True, True, "the clipping norm (0 = off)"),
    "adam_beta1": (0.0, 1.0, True, False, "Adam's first-moment decay"),
    "adam_beta2": (0.0, 1.0, True, False, "Adam's second-moment decay"),
    "adam_epsilon": (0.0, None, False, True, "Adam's epsilon"),
    "label_smoothing_factor": (0.0, 1.0, True, False, "label smoothing"),
    "num_train_epochs": (0.0, 1e6, True, True, "epochs"),
}
SEEDS = ("seed", "data_seed")


def _value(r, key):
    return getattr(r, key) if hasattr(r, key) and key != "extra" else r.extra.get(key)


def problems(r) -> list[DevopsError]:
    out: list[DevopsError] = []
    for key, (low, high, low_in, high_in, what) in FLOAT_RANGES.items():
        value = _value(r, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if (value < low or (value == low and not low_in)) or (high is not None and (value > high or (value == high and not high_in))):
            span = f"{'[' if low_in else '('}{low:g}, {'∞)' if high is None else f'{high:g}' + (']' if high_in else ')')}"
            out.append(DevopsError(f"{key} {value:g} is out of range {span} ({what})", r.where(key)))
    for key in SEEDS:
        value = _value(r, key)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= SEED_MAX:
            out.append(DevopsError(f"{key} {value} is out of range", r.where(key), f"use 0..{SEED_MAX} (numpy's seed range)"))
    for key, value in [*r.to_dict().items()]:
        if key in SEEDS or isinstance(value, bool) or not isinstance(value, int):
            continue
        if abs(value) > INT_MAX:
            out.append(DevopsError(f"{key} {value} is out of range", r.where(key), f"use at most {INT_MAX}"))
    accumulation = r.gradient_accumulation_steps
    if isinstance(accumulation, int) and MAX_ACCUMULATION < accumulation <= INT_MAX:
        out.append(DevopsError(f"gradient_accumulation_steps {accumulation} is past {MAX_ACCUMULATION}: the Trainer holds "
                               "a step's micro-batches in memory before it takes the step", r.where("gradient_accumulation_steps"),
                               "raise per_device_train_batch_size or the workers instead"))
    return out
