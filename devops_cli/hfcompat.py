"""The names transformers gives things that have moved between releases, asked of the installed
transformers itself (never of its version number), in one place.

transformers 5.24 renamed the KV-cache argument and output field of every model and layer forward
from `past_key_values` to `cache` (the old name is a deprecated alias until 5.40). Code of ours that
calls a forward, or stands in for one, asks here which name the module in hand takes.
"""

from __future__ import annotations

import inspect

OLD, NEW = "past_key_values", "cache"


def cache_kwarg(module) -> str:
    """The keyword under which `module`'s forward takes the KV cache: 'cache' (transformers >= 5.24)
    or 'past_key_values' (earlier). Read from the forward's own signature (through its decorators)."""
    forward = module.forward if hasattr(module, "forward") else module
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        params = {}
    if NEW in params:
        return NEW
    if OLD in params:
        return OLD
    raise RuntimeError(f"{type(module).__name__}.forward takes neither '{NEW}' nor '{OLD}': transformers "
                       "changed how a KV cache is passed; devops-model needs updating for this release")


def output_cache(output):
    """The cache a forward returned (`output.cache` from 5.24 on, `output.past_key_values` before),
    read from the output class's own fields, never through the deprecated alias."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    for name in (NEW, OLD):
        if name in fields:
            return getattr(output, name)
    raise RuntimeError(f"{type(output).__name__} has neither a '{NEW}' nor a '{OLD}' field: transformers "
                       "changed how a forward returns its KV cache; devops-model needs updating for this release")


def takes_logits_to_keep(model) -> bool:
    """Most causal LMs of transformers 5 compute the vocabulary projection only for the kept positions."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
