"""First-token scoring: one forward pass per question, logits at the last prompt position for the
four option ids only.

Speed without changing a prediction:
- Prompts that share a few-shot block (every question of a subject) share their longest common
  token prefix. That prefix runs once; its KV cache is reused by every question of the group, so
  only each question's own tokens are computed.
- The per-question suffixes are sorted by length and batched with right padding. Under the causal
  mask a real token never sees a pad to its right, so padding changes no logit; logits are read at
  each row's last real token, through the output embedding rows of the four options only.

`reference()` is the plain way (whole prompt, batch of one, full vocabulary logits): the tests and
the bench compare against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Group:
    prefix: list[int]
    members: list[tuple[int, list[int]]] = field(default_factory=list)  # (question index, suffix ids)


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of token lists, leaving every list at least one own token."""
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def plan(prompts: list[list[int]], keys: list) -> list[Group]:
    """Group prompts by key (same few-shot block) and split off each group's common token prefix.
    Working on token ids, not strings, makes the split exact whatever the tokenizer does at seams."""
    by_key: dict = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    groups = []
    for idx in by_key.values():
        n = common_prefix([prompts[i] for i in idx])
        groups.append(Group(prompts[idx[0]][:n], [(i, prompts[i][n:]) for i in idx]))
    return groups


class Scorer:
    def __init__(self, model, option_ids: list[int]):
        self.model = model
        self.option_ids = list(option_ids)
        self.device = next(model.parameters()).device
        head = model.get_output_embeddings()
        self.decoder = model.get_decoder()
        config = model.config.get_text_config()
        # models that post-process logits (soft-capping, scaling) go through their own head
        self.plain_head = (head is not None and not getattr(config, "final_logit_softcapping", None)
                           and getattr(config, "logit_scale", None) in (None, 1, 1.0))  # fmt: skip
        if self.plain_head:
            ids = torch.tensor(self.option_ids, device=self.device)
            self.w = head.weight[ids].detach()
            self.b = head.bias[ids].detach() if getattr(head, "bias", None) is not None else None

    @torch.inference_mode()
    def reference(self, ids: list[int]) -> torch.Tensor:
        """The plain way: the whole prompt alone, full logits, last position, four option ids."""
        x = torch.tensor([ids], device=self.device)
        return self.model(input_ids=x).logits[0, -1, self.option_ids].float().cpu()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.plain_head:
            return torch.nn.functional.linear(hidden, self.w, self.b).float()
        return self.model.get_output_embeddings()(hidden)[..., self.option_ids].float()

    def _expand(self, cache_class, kv, n: int):
        """A cache holding the prefix for n rows. The rows are stride-0 views of the one prefix: the
        forward's own concatenation with the new tokens is then the only copy."""
        cache = cache_class(config=self.model.config)
        if len(cache.layers) != len(kv) or any(getattr(layer, "is_sliding", False) for layer in cache.layers):
            return cache_class(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv],
                               config=self.model.config)  # fmt: skip
        for layer, (k, v) in zip(cache.layers, kv):
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)
        return cache

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], keys: list, batch_size: int | None = None, on_done=None) -> torch.Tensor:
        """(N, 4) logits. batch_size None = auto (by a token budget). on_done(n) after each batch."""
        from transformers import DynamicCache

        out = torch.empty(len(prompts), len(self.option_ids))
        pad = 0
        for g in plan(prompts, keys):
            kv = None
            if g.prefix:
                x = torch.tensor([g.prefix], device=self.device)
                cache = self.decoder(input_ids=x, use_cache=True).past_key_values
                kv = [(layer.keys, layer.values) for layer in cache.layers]
            members = sorted(g.members, key=lambda m: -len(m[1]))
            start = 0
            while start < len(members):
                rows = batch_size or auto_rows(len(members[start][1]), len(g.prefix))
                batch = members[start : start + rows]
                start += len(batch)
                n, width = len(batch), len(batch[0][1])
                x = torch.full((n, width), pad, dtype=torch.long, device=self.device)
                for r, (_, suffix) in enumerate(batch):
                    x[r, : len(suffix)] = torch.tensor(suffix)
                p = len(g.prefix)
                pos = torch.arange(p, p + width, device=self.device).expand(n, width)
                past = None if kv is None else self._expand(DynamicCache, kv, n)
                mask = torch.ones((n, p + width), dtype=torch.long, device=self.device)
                hidden = self.decoder(input_ids=x, position_ids=pos, attention_mask=mask, past_key_values=past,
                                      use_cache=past is not None).last_hidden_state  # fmt: skip
                last = torch.tensor([len(s) - 1 for _, s in batch], device=self.device)
                logits = self._logits(hidden[torch.arange(n, device=self.device), last]).cpu()
                for r, (i, _) in enumerate(batch):
                    out[i] = logits[r]
                if on_done:
                    on_done(n)
        return out


def auto_rows(width: int, prefix: int, budget: int = 4096, max_rows: int = 64) -> int:
    """Rows per batch: about `budget` new tokens, fewer when the reused prefix is long (each row
    holds a copy of its KV cache)."""
    rows = max(1, budget // max(width, 1))
    if prefix:
        rows = min(rows, max(1, 65536 // (prefix + width)))
    return min(rows, max_rows)


def predict(logits: torch.Tensor) -> list[int]:
    """Index of the largest of the four logits; ties go to the first (the harness compares with a
    strict '>' in A, B, C, D order)."""
    best = []
    for row in logits.tolist():
        k = 0
        for j in range(1, len(row)):
            if row[j] > row[k]:
                k = j
        best.append(k)
    return best
