"""The shared prefix's cache, made once per few-shot group and handed to every batch of its questions.

Two kinds of cache layer are reused:
- key/value layers (full attention; `DynamicLayer`, sliding windows through the config): the prefix's
  keys and values, as stride-0 views for n rows. The forward appends the suffix by concatenation, so
  the views are never written to.
- recurrent layers (Qwen3.5's Gated-DeltaNet linear attention; `LinearAttentionLayer`): a conv state
  (the last kernel-size inputs) and a recurrent state, both the state after the whole prefix. They
  cannot be cut back to the first p positions of a longer forward, so the prefix runs on its own, and
  since the forward updates them in place (`copy_`), every batch gets its own copy, one row per
  question. Causal conv and recurrence read no position to the right, so right padding changes no
  real token here either.
Any other kind of layer (a cache transformers adds later) raises `NotReusable`: the scorer then says
so and scores the plain way, rather than guess what such a layer holds.
"""

from __future__ import annotations

import copy


class NotReusable(Exception):
    """The prefix cache holds a layer this module does not know how to hand to several rows."""


def is_key_value(cache) -> bool:
    """Every layer holds keys and values (no recurrent state)."""
    return all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in cache.layers)


def sliced_kv(cache, p: int, n: int):
    """The first p positions of every layer of a cache filled by an n-token forward, or None when p is
    0, a layer holds recurrent state (nothing to cut), or a layer did not keep all n (a sliding window)."""
    if not p or not is_key_value(cache):
        return None
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    if any(k is None or k.shape[-2] != n for k, _ in kv):
        return None
    return [(k[:, :, :p], v[:, :, :p]) for k, v in kv]


def expand(cache_class, kv, n: int, config):
    """A key/value cache holding the prefix for n rows. The rows are stride-0 views of the one prefix:
    the forward's own concatenation with the new tokens is then the only copy."""
    cache = cache_class(config=config)
    if len(cache.layers) != len(kv) or any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return cache_class(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv],
                           config=config)  # fmt: skip
    for layer, (k, v) in zip(cache.layers, kv):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)
    return cache


def replicate(cache, n: int):
    """A copy of a one-row prefix cache with recurrent layers, for n rows, that a forward may update
    without touching the original: key/value layers as stride-0 views, conv and recurrent states
    copied per row."""
    from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

    layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        for name, value in vars(layer).items():  # per-layer flag dicts: the forward sets them
            if isinstance(value, dict):
                setattr(new, name, dict(value))
        if type(layer) is DynamicLayer:
            if getattr(layer, "keys", None) is not None:
                new.keys, new.values = layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1)
        elif type(layer) is LinearAttentionLayer:
            for states in (new.conv_states, new.recurrent_states):
                for i, t in states.items():
                    if t is not None:
                        states[i] = t.repeat(n, *[1] * (t.dim() - 1))
        else:
            raise NotReusable(type(layer).__name__)
        layers.append(new)
    out = copy.copy(cache)
    out.layers = layers
    return out
