"""Top-k and top-p for transformers' continuous batching without sorting the whole vocabulary.

transformers' per-request warpers (`cb_logits_processors.py`) sort every row's whole vocabulary, twice a
step: also when no request of the batch asks for them (top_k = the vocabulary, top_p = 1 — what a
request with only a temperature gets, `data qa`'s) and for greedy requests in the batch (top_k 1). On the
tiny model at 8 requests that was 28 % of the generation thread. These do the same work with
`torch.topk` on the k largest scores only, and skip a warper no row of the batch needs:

- top-k: the k-th largest by `torch.topk` instead of a full sort; no-op when every k covers the vocabulary.
  The same scores as transformers' to the bit.
- top-p: no-op when every top_p is 1; after a top-k it reads only the candidates top-k left; a top_p < 1
  on a row top-k did not cut takes transformers' own warper (a full sort is the work there). The same
  tokens kept, up to the order of float additions at the nucleus's edge.

Installed only where transformers runs the step eagerly (no CUDA graph, no torch.compile: a branch on the
batch's settings cannot be captured). Each warper checks itself against transformers' on synthetic
scores when installed and on its first live batches where it cut (guard's rule); a disagreement puts transformers'
warper back for the rest of the run, with one warning.
"""

from __future__ import annotations

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)

LIVE_CHECKS = 3  # live batches each warper compares against transformers' (where it cut) before it trusts itself


def top_k(scores: torch.Tensor, k: torch.Tensor, filter_value: float) -> torch.Tensor:
    """Mask all but each row's k largest scores (ties at the k-th kept, as transformers does)."""
    cut = k < scores.size(-1)
    if not bool(cut.any()):
        return scores
    largest = int(k[cut].max())
    k = k.clamp(max=largest).unsqueeze(-1).long()
    thresholds = torch.topk(scores, largest, dim=-1).values.gather(-1, k - 1)
    thresholds = thresholds.masked_fill(~cut.unsqueeze(-1), float("-inf"))  # a row whose k covers the vocabulary
    return scores.masked_fill(scores < thresholds, filter_value)


def top_p(scores: torch.Tensor, p: torch.Tensor, filter_value: float, min_keep: int) -> torch.Tensor | None:
    """Mask the tokens outside each row's nucleus, or None when a row needs a full sort (top_p < 1 on a
    row whose candidates are the whole vocabulary)."""
    cut = p < 1
    if not bool(cut.any()):
        return scores
    candidates = int(torch.isfinite(scores[cut]).sum(-1).max())
    if candidates >= scores.size(-1):
        return None
    values, indices = torch.topk(scores, max(candidates, min_keep), dim=-1)  # descending
    values, indices = values.flip(-1), indices.flip(-1)  # ascending, as transformers' rule reads them
    remove = values.softmax(-1).cumsum(-1) <= (1 - p).unsqueeze(-1)
    remove[..., -min_keep:] = False
    remove &= cut.unsqueeze(-1)  # a row with top_p 1 loses nothing (transformers': its zero-probability tokens)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, indices, remove)
    return scores.masked_fill(mask, filter_value)


def differs(ours: torch.Tensor, plain: torch.Tensor) -> str | None:
    """How two warped score tensors sample differently; None when they keep as many tokens per row,
    differ only among tokens tied at a row's edge (which of them a sort keeps is arbitrary) and give the
    same probabilities up to float rounding. Kept = sampled with a probability above 0 (transformers'
    top-p with top_p 1 masks the tokens whose probability is 0; ours leaves them, at probability 0)."""
    probs, probs_plain = ours.softmax(-1), plain.softmax(-1)
    kept, kept_plain = probs > 0, probs_plain > 0
    count, count_plain = kept.sum(-1), kept_plain.sum(-1)
    if not torch.equal(count, count_plain):
        row = int((count != count_plain).nonzero()[0])
        return f"row {row} kept {int(count[row])} tokens, transformers' {int(count_plain[row])}"
    edge = plain.masked_fill(~kept_plain, float("inf")).min(-1, keepdim=True).values
    if bool(((kept != kept_plain) & (torch.maximum(ours, plain) != edge)).any()):  # the score one of them kept
        return "different tokens kept (not ties)"
    gap = (probs.sort(-1).values - probs_plain.sort(-1).values).abs().max().item()
    return None if gap <= 1e-6 else f"probabilities differ by {gap:.3g}"


class _Checked:
    """Ours until it disagrees with transformers' warper (`plain`) on a live batch."""

    def _setup(self, name: str) -> None:
        self.name, self.checks, self.plain_only = name, LIVE_CHECKS, False

    def _give_up(self, why: str) -> None:
        from devops_cli import guard

        self.plain_only = True
        guard.fallback("serve", f"{self.name} warper", why, f"transformers' {self.name} warper")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if self.plain_only:
            return super().__call__(scores, tensor_arg)
        try:
            ours = self.fast(scores, tensor_arg)
        except Exception as e:  # noqa: BLE001 - said, and transformers' warper takes over
            self._give_up(f"it raised {type(e).__name__}: {e}")
            return super().__call__(scores, tensor_arg)
        if ours is None:
            return super().__call__(scores, tensor_arg)
        if self.checks > 0 and ours is not scores:  # checked where it did work (a no-op is the input itself)
            self.checks -= 1
            plain = super().__call__(scores, tensor_arg)
            if why := differs(ours, plain):
                self._give_up(why)
                return plain
        return ours


class TopK(_Checked, ContinuousBatchingTopKLogitsWarper):
    def __init__(self, plain: ContinuousBatchingTopKLogitsWarper):
        self.__dict__.update(plain.__dict__)
        self._setup("top-k")

    def fast(self, scores, tensor_arg):
        return top_k(scores, tensor_arg[: scores.size(0)], self.filter_value)


class TopP(_Checked, ContinuousBatchingTopPLogitsWarper):
    def __init__(self, plain: ContinuousBatchingTopPLogitsWarper):
        self.__dict__.update(plain.__dict__)
        self._setup("top-p")

    def fast(self, scores, tensor_arg):
        p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        return top_p(scores, p, self.filter_value, self.min_tokens_to_keep)


def synthetic_check(ours_k: TopK, ours_p: TopP, vocab: int, device) -> str | None:
    """Ours against transformers' on made-up scores with the settings `serve` sends (greedy, off, small k,
    k and p): None when they agree."""
    generator = torch.Generator("cpu").manual_seed(0)
    settings = [(1, 1.0), (vocab, 1.0), (20, 0.8), (50, 0.95), (50, 1.0), (3, 0.5), (7, 0.999)]
    scores = (torch.randn(len(settings), vocab, generator=generator) * 4).to(device)
    ks = torch.tensor([min(k, vocab) for k, _ in settings], dtype=torch.int32, device=device)
    ps = torch.tensor([p for _, p in settings], dtype=torch.float32, device=device)
    plain = ContinuousBatchingTopKLogitsWarper.__call__(ours_k, scores, ks)
    ours = top_k(scores, ks, ours_k.filter_value)
    if not torch.equal(ours, plain):
        return "top-k kept different scores on synthetic logits"
    plain = ContinuousBatchingTopPLogitsWarper.__call__(ours_p, plain, ps.view(dtype=torch.int32))
    ours = top_p(ours, ps, ours_p.filter_value, ours_p.min_tokens_to_keep)
    if ours is None:  # every row with top_p < 1 has a top_k here: its candidates are known
        return "top-p wanted a full sort after top-k on synthetic logits"
    if why := differs(ours, plain):
        return f"top-p on synthetic logits: {why}"
    return None


def install(manager, vocab: int, device) -> str:
    """Put ours in place of the top-k and top-p warpers of a manager not yet started; returns what it
    did, for the log."""
    from devops_cli import guard

    config = manager.continuous_batching_config
    if any(config.cuda_graph_booleans) or config.varlen_compile_config or config.decode_compile_config:
        return "transformers' top-k/top-p: the step is captured or compiled"
    processors = manager.logit_processor.logits_processor
    slots = {type(p): i for i, p in enumerate(processors)}
    k_at, p_at = slots.get(ContinuousBatchingTopKLogitsWarper), slots.get(ContinuousBatchingTopPLogitsWarper)
    if k_at is None or p_at is None or k_at > p_at:
        return "transformers' top-k/top-p"
    ours_k, ours_p = TopK(processors[k_at]), TopP(processors[p_at])
    try:
        why = synthetic_check(ours_k, ours_p, vocab, device)
    except Exception as e:  # noqa: BLE001 - said, and transformers' warpers stay
        why = f"it raised {type(e).__name__}: {e}"
    if why:
        return guard.fallback("serve", "top-k/top-p without full sorts", why, "transformers' warpers")
    processors[k_at], processors[p_at] = ours_k, ours_p
    return "top-k/top-p without full sorts, checked against transformers'"
