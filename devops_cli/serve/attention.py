"""Attention one sequence at a time for transformers' continuous batching on sdpa (CPU).

Without a flash kernel, transformers' continuous batching packs every sequence of a step into one row
and runs one sdpa over all their keys with a block-diagonal mask: each sequence's queries are scored
against every other sequence's keys and masked away, so a step's attention grows with the square of the
batch. This runs sdpa per sequence on its own block (the same queries, keys, values and mask block):
on the tiny model with 467-token prompts, 8 requests went from 850-950 to 1,125-1,160 tokens/s in-process
(`bench/data_qa.py --max-tokens 256`: 2.25x -> 3.20x over one at a time, docs/data-qa.md).

Only for calls transformers' batching makes (they carry `cu_seq_lens_q/k` and the paged cache's
`read_index`) with a mask and more than one sequence; every other call is transformers' sdpa untouched.
On CPU only: on a GPU continuous batching takes flash attention when it is installed, and a Python loop
of per-sequence kernels would be bound by kernel launches at large batches (not measured here).

It checks itself (guard's rule): its first CHECKS multi-sequence calls of each kind (decode steps;
steps with a prompt) are also computed the plain way and compared within guard.tolerance; a difference
or an error hands every later call to transformers' sdpa, with one warning.
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CHECKS = 16  # multi-sequence calls (a layer each) of each kind compared with the plain path before it trusts itself


class PerSequence:
    def __init__(self, plain):
        self.plain, self.plain_only, self.layers = plain, False, 0
        self.checks = {"decode": CHECKS, "prefill": CHECKS}  # each kind of step is checked on its own

    def __call__(self, module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        blocks = None if self.plain_only else _blocks(module, query, attention_mask, dropout, kwargs)
        if blocks is None:
            return self.plain(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        try:
            ours = attend(module, query, key, value, attention_mask, scaling, blocks)
        except Exception as e:  # noqa: BLE001 - said, and the plain path takes over
            self._give_up(f"it raised {type(e).__name__}: {e}")
            ours = None
        kind = "decode" if all(qe - qs == 1 for qs, qe, _, _ in blocks) else "prefill"
        if ours is None or self.checks[kind] > 0:
            plain = self.plain(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
            if ours is None:
                return plain
            self.checks[kind] -= 1
            if why := differs(ours, plain[0], self.layers):
                self._give_up(why)
                return plain
        return ours, None

    def _give_up(self, why: str) -> None:
        from devops_cli import guard

        if not self.plain_only:
            self.plain_only = True
            guard.fallback("serve", "per-sequence attention", why, "transformers' packed sdpa")


def _blocks(module, query, attention_mask, dropout, kwargs) -> list[tuple[int, int, int, int]] | None:
    """(q start, q end, k start, k end) of each sequence of a batched call, or None: not ours to take."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if (cu_q is None or cu_k is None or "read_index" not in kwargs or attention_mask is None or dropout
            or query.device.type != "cpu" or query.shape[0] != 1 or module.training
            or any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux"))):
        return None
    if isinstance(cu_k, dict):  # one per layer type when a model mixes them
        cu_k = cu_k.get(getattr(module, "layer_type", None))
        if cu_k is None:
            return None
    if isinstance(attention_mask, dict):
        return None
    q, k = cu_q.tolist(), cu_k.tolist()
    if len(q) < 3 or len(q) != len(k):  # one sequence: the packed call is the same work
        return None
    return [(q[i], q[i + 1], k[i], k[i + 1]) for i in range(len(q) - 1)]


def attend(module, query, key, value, attention_mask, scaling, blocks) -> torch.Tensor:
    """sdpa on each sequence's own queries, keys, values and mask block; the packed call's output layout
    ([1, queries, heads, head_dim])."""
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outs = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, qs:qe], key[:, :, ks:ke], value[:, :, ks:ke], attn_mask=attention_mask[..., qs:qe, ks:ke],
        scale=scaling, enable_gqa=gqa) for qs, qe, ks, ke in blocks if qe > qs]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def differs(ours: torch.Tensor, plain: torch.Tensor, layers: int) -> str | None:
    from devops_cli import guard

    if ours.shape != plain.shape:
        return f"shape {tuple(ours.shape)} vs {tuple(plain.shape)}"
    gap, allowed = (ours - plain).abs().max().item(), guard.tolerance(plain.dtype, plain, layers)
    return None if gap <= allowed else f"max |diff| {gap:.3g} > {allowed:.3g}"


def install(model) -> str:
    """Route transformers' sdpa through PerSequence (once per process; calls that are not continuous
    batching's go to sdpa untouched); returns what the engine says of it."""
    from devops_cli import guard

    if model.device.type != "cpu" or model.config._attn_implementation != "sdpa":
        return "transformers' attention"
    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not isinstance(current, PerSequence):
        current = PerSequence(current)
        ALL_ATTENTION_FUNCTIONS["sdpa"] = current
    current.layers = max(current.layers, guard.depth(model))
    return "transformers' packed sdpa" if current.plain_only else "attention per sequence"
