"""First-token scoring: one forward pass per question, logits at the last prompt position for the
four option ids only.

Speed without changing a prediction:
- Prompts that share a few-shot block (every question of a subject) share their longest common
  token prefix. That prefix runs once; its KV cache is reused by every question of the group, so
  only each question's own tokens are computed. Caches with recurrent state (Qwen3.5's linear-
  attention layers) are reused too: the prefix's conv and recurrent states, copied per row (prefix.py).
- The per-question suffixes are sorted by length and batched with right padding. Under the causal
  mask a real token never sees a pad to its right, so padding changes no logit; logits are read at
  each row's last real token, through the output embedding rows of the four options only.
- Batches are cut where they waste the least padding (`batches`, a small dynamic programme), not at a
  fixed row count: padding added 27% to the real tokens of the 5-shot exam, now 4%.
- The last decoder layer computes keys and values for every token (the last token attends to them) but
  its query, attention, output projection and MLP for each row's last token only (`_LastTokenLayer`,
  for the plain pre-norm layers of Qwen2, Llama, Mistral, Qwen3).
- On CPU, SDPA reads the grouped key/value heads as they are instead of a per-head copy.
Measured on the 4x512 random Qwen2, 5 shots, 1 thread: scoring 22.1 s -> 12.4 s (best of 6 alternating
full runs on a busy 2-core machine).

`reference()` is the plain way (whole prompt, batch of one, the model's own forward and head): the
tests and the bench compare against it, and so does every run. Before the scores of a prefix group are
trusted, one of its questions (its shortest: the most right padding in its batch, on the shared
prefix) is scored the plain way too. Beyond `guard.tolerance` the run
warns, naming the transformers release, and scores every question the plain way: a fast wrong answer
is the one outcome this module must not produce. A cache layer of a kind prefix.py does not know,
or any exception inside the fast path, ends the same way (warning, plain path): a speed trick that
crashes is a defect. `Scorer.used` says which path gave the numbers.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from devops_cli import guard
from devops_cli.hfcompat import cache_kwarg, output_cache, takes_logits_to_keep


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
        self.cache_name = cache_kwarg(self.decoder)
        self.used = "fast"
        config = model.config.get_text_config()
        self.layers = guard.depth(model)  # the self-check's tolerance grows with depth
        # models that post-process logits (soft-capping, scaling) go through their own head
        self.plain_head = (head is not None and not getattr(config, "final_logit_softcapping", None)
                           and getattr(config, "logit_scale", None) in (None, 1, 1.0))  # fmt: skip
        if self.plain_head:
            ids = torch.tensor(self.option_ids, device=self.device)
            self.w = head.weight[ids].detach()
            self.b = head.bias[ids].detach() if getattr(head, "bias", None) is not None else None

    @torch.inference_mode()
    def reference(self, ids: list[int], keep_cache: bool = False):
        """The plain way: the whole prompt alone through the model's own forward and head (its own
        `logits_to_keep=1` where it has one), last position, four option ids. keep_cache: also
        return the KV cache that forward filled."""
        x = torch.tensor([ids], device=self.device)
        extra = {"logits_to_keep": 1} if takes_logits_to_keep(self.model) else {}
        out = self.model(input_ids=x, use_cache=keep_cache, **extra)
        logits = out.logits[0, -1, self.option_ids].float().cpu()
        return (logits, output_cache(out)) if keep_cache else logits

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.plain_head:
            return torch.nn.functional.linear(hidden, self.w, self.b).float()
        return self.model.get_output_embeddings()(hidden)[..., self.option_ids].float()

    def score(self, prompts: list[list[int]], keys: list, batch_size: int | None = None, on_progress=None,
              check: bool = True, describe=lambda i: f"question {i}") -> torch.Tensor:
        """(N, 4) logits. batch_size None = auto (batches cut to waste the least padding).
        on_progress(done) after each batch. check: the run-time self-check of every prefix group
        against the plain forward (see the module's docstring); describe(i) names question i in its
        warning."""
        from devops_cli.eval.prefix import NotReusable

        self.used = "fast"
        try:
            return self._fast(prompts, keys, batch_size, on_progress, check)
        except SelfCheckFailed as failed:
            i, diff, tol = failed.args
            self.used = guard.fallback("eval", "fast path", f"{describe(i)}: max |logit diff| {diff:.3g} > "
                                       f"{tol:.3g} in {self.dtype_name}", "whole-prompt forward passes")  # fmt: skip
        except NotReusable as e:
            self.used = guard.fallback("eval", "fast path", f"its prefix cache holds {e} layers, which it cannot "
                                       "share between questions", "whole-prompt forward passes")  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a speed trick that crashes must not end the run
            from devops_cli.errors import first_line

            self.used = guard.fallback("eval", "fast path", f"it raised {type(e).__name__}: {first_line(e)}",
                                       "whole-prompt forward passes")  # fmt: skip
        return self.plain(prompts, on_progress)

    @torch.inference_mode()
    def plain(self, prompts: list[list[int]], on_progress=None) -> torch.Tensor:
        """Every prompt the plain way, one at a time."""
        out = torch.empty(len(prompts), len(self.option_ids))
        for i, ids in enumerate(prompts):
            out[i] = self.reference(ids)
            if on_progress and (i % 16 == 15 or i == len(prompts) - 1):
                on_progress(i + 1)
        return out

    @property
    def dtype_name(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @torch.inference_mode()
    def _fast(self, prompts, keys, batch_size, on_progress, check) -> torch.Tensor:
        from transformers import DynamicCache

        from devops_cli.eval import prefix as cached

        out = torch.empty(len(prompts), len(self.option_ids))
        pad, done = 0, 0
        with self._last_token_only() as last_only, _gqa_in_sdpa(self.device):
            for g in plan(prompts, keys):
                p = len(g.prefix)
                members = sorted(g.members, key=lambda m: -len(m[1]))
                lengths = [len(s) for _, s in members]
                cuts = [(i, i + batch_size) for i in range(0, len(members), batch_size)] if batch_size else \
                    batches(lengths, p, self.attention_ratio)  # fmt: skip
                # the question checked: the group's shortest (the last row of its last batch: the
                # most right padding there). Its plain whole-prompt forward also fills the prefix's KV
                # cache (causal: the first p positions' keys and values are the prefix's own), so the
                # check costs only that question's own few tokens once more.
                # A cache with recurrent layers (Qwen3.5) cannot be cut back to the prefix: the prefix
                # then runs on its own, and each batch gets its own copy of its states (prefix.py).
                probe, kv, state = members[-1][0], None, None
                if check:
                    with self._library_layers(last_only):
                        reference, cache = self.reference(prompts[probe], keep_cache=True)
                    kv = cached.sliced_kv(cache, p, len(prompts[probe]))
                if p and kv is None:
                    x = torch.tensor([g.prefix], device=self.device)
                    with self._full_last_layer():
                        cache = output_cache(self.decoder(input_ids=x, use_cache=True))
                    if cached.is_key_value(cache):
                        kv = [(layer.keys, layer.values) for layer in cache.layers]
                    else:
                        state = cache
                for a, b in cuts:
                    batch = members[a:b]
                    n, width = len(batch), len(batch[0][1])
                    x = torch.full((n, width), pad, dtype=torch.long, device=self.device)
                    for r, (_, suffix) in enumerate(batch):
                        x[r, : len(suffix)] = torch.tensor(suffix)
                    pos = torch.arange(p, p + width, device=self.device).expand(n, width)
                    past = (cached.expand(DynamicCache, kv, n, self.model.config) if kv is not None
                            else cached.replicate(state, n) if state is not None else None)  # fmt: skip
                    mask = torch.ones((n, p + width), dtype=torch.long, device=self.device)
                    last = torch.tensor([len(s) - 1 for _, s in batch], device=self.device)
                    if last_only is not None:
                        last_only.last = last
                    hidden = self.decoder(input_ids=x, position_ids=pos, attention_mask=mask, use_cache=past is not None,
                                          **{self.cache_name: past}).last_hidden_state  # fmt: skip
                    rows = torch.arange(n, device=self.device)
                    logits = self._logits(hidden[:, 0] if last_only is not None else hidden[rows, last]).cpu()
                    if check and b >= len(members):
                        diff = (logits[-1] - reference).abs().max().item()
                        tol = guard.tolerance(self.dtype_name, reference, self.layers)
                        if not diff <= tol:  # NaN fails too
                            raise SelfCheckFailed(probe, diff, tol)
                    for r, (i, _) in enumerate(batch):
                        out[i] = logits[r]
                    done += n
                    if on_progress:
                        on_progress(done)
        return out

    @contextmanager
    def _library_layers(self, last_only):
        """The model as transformers built it, for the plain reference in the middle of a fast run."""
        import os

        gqa = os.environ.pop(GQA_SWITCH, None)
        try:
            with self._full_last_layer() if last_only is not None else nullcontext():
                yield
        finally:
            if gqa is not None:
                os.environ[GQA_SWITCH] = gqa

    @property
    def attention_ratio(self) -> float:
        """Weights of one decoder layer per attention width (query x head dim): how many keys one query
        attends to cost as much as the token's own matrix products."""
        layers = getattr(self.decoder, "layers", None)
        config = self.model.config.get_text_config()
        width = getattr(config, "num_attention_heads", 0) * (getattr(config, "head_dim", None)
                                                             or config.hidden_size // max(config.num_attention_heads, 1))
        if not layers or not width:
            return 4096.0
        return sum(t.numel() for t in layers[-1].parameters()) / (2 * width)

    @contextmanager
    def _last_token_only(self):
        """Only the last real token of a row reaches the logits, and the last decoder layer feeds no
        cache: its MLP (and what follows the attention) runs for that one token per row. Done by
        swapping in a wrapper of the layer itself (its own modules, same order of operations), for the
        pre-norm layers whose forward is exactly attention-residual, MLP-residual; others run whole."""
        layers = getattr(self.decoder, "layers", None)
        layer = layers[-1] if layers is not None and len(layers) else None
        if type(layer).__name__ not in _PLAIN_LAYERS or not all(hasattr(layer, a) for a in
                                                               ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")):  # fmt: skip
            yield None
            return
        wrapper = _LastTokenLayer(layer)
        layers[-1] = wrapper
        self._wrapper = wrapper
        try:
            yield wrapper
        finally:
            layers[-1] = layer
            self._wrapper = None

    @contextmanager
    def _full_last_layer(self):
        """The prefix pass fills every layer's cache: the last layer runs whole there."""
        wrapper = getattr(self, "_wrapper", None)
        if wrapper is None:
            yield
            return
        self.decoder.layers[-1] = wrapper.layer
        try:
            yield
        finally:
            self.decoder.layers[-1] = wrapper


class SelfCheckFailed(Exception):
    """(question index, max |logit diff|, tolerance): the fast path disagreed with the plain one."""


GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextmanager
def _gqa_in_sdpa(device):
    """On CPU, let SDPA read grouped key/value heads as they are (enable_gqa) rather than have
    transformers copy them out per query head first (what it does whenever a mask is passed): about
    half the attention time, same numbers. transformers reads this switch at every attention call."""
    import os

    name = GQA_SWITCH
    before = os.environ.get(name)
    if device.type == "cpu":
        os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# decoder layers whose forward is: h + attn(norm1(h)), then h + mlp(norm2(h)) (checked in transformers 5)
_PLAIN_LAYERS = {"Qwen2DecoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer", "Qwen3DecoderLayer"}


class _LastTokenLayer(torch.nn.Module):
    """The last decoder layer for each row's last real token only (`last`, set per batch). Keys and
    values are computed for every token (the last token attends to them), the query, the attention
    itself, the output projection and the MLP for that one token. Returns (rows, 1, hidden).

    The attention is the layer's own modules and rotary function with the same softmax(QK^T*scale)V,
    for attention modules without a sliding window; others run their attention for every token."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.last = None
        self.cache_name = cache_kwarg(layer)  # what the decoder passes the cache as, to this layer
        attn = layer.self_attn
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
        rotary = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        self.rotary = rotary if window is None and all(hasattr(attn, a) for a in _ATTN_PARTS) else None

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        layer = self.layer
        n = hidden_states.shape[0]
        rows = torch.arange(n, device=hidden_states.device)
        x = layer.input_layernorm(hidden_states)
        if self.rotary is None or position_embeddings is None:
            attn, _ = layer.self_attn(hidden_states=x, attention_mask=attention_mask,
                                      position_embeddings=position_embeddings, **kwargs)  # fmt: skip
            attn = attn[rows, self.last][:, None]
        else:
            attn = self._last_query(x, rows, position_embeddings, kwargs.get(self.cache_name))
        h = hidden_states[rows, self.last][:, None] + attn
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _last_query(self, x, rows, position_embeddings, cache):
        a = self.layer.self_attn
        n, width, _ = x.shape
        q = a.q_proj(x[rows, self.last][:, None]).view(n, 1, -1, a.head_dim)
        k = a.k_proj(x).view(n, width, -1, a.head_dim)
        if hasattr(a, "q_norm"):  # Qwen3: per-head norms before the rotary embedding
            q, k = a.q_norm(q), a.k_norm(k)
        v = a.v_proj(x).view(n, width, -1, a.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, _ = self.rotary(q.transpose(1, 2), q.transpose(1, 2), cos[rows, self.last][:, None], sin[rows, self.last][:, None])
        _, k = self.rotary(k.transpose(1, 2), k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, a.layer_idx)
        keys = k.shape[2]
        # row r sees the prefix and its own tokens up to its last real one (pads lie to the right)
        visible = torch.arange(keys, device=x.device) <= (keys - width + self.last)[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :],
                                                               scale=a.scaling, enable_gqa=q.shape[1] != k.shape[1])
        return a.o_proj(out.transpose(1, 2).reshape(n, 1, -1))


_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")


def batches(lengths: list[int], prefix: int, ratio: float, budget: int = 4096, max_rows: int = 64,
            overhead: int = 64) -> list[tuple[int, int]]:
    """Cut suffixes sorted longest first into batches [a, b) that cost the least in all: a batch costs
    rows x width padded tokens, each token its weights plus attention over prefix + width keys
    (`ratio` keys cost one token's weights), plus `overhead` tokens per forward. A batch holds at most
    `auto_rows` rows."""
    m = len(lengths)
    best = [0.0] + [float("inf")] * m  # best[j]: cheapest cut of lengths[:j]
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        for i in range(j - 1, -1, -1):
            w = lengths[i]
            rows = j - i
            if rows > auto_rows(w, prefix, budget, max_rows):
                break
            c = best[i] + rows * w * (1 + (prefix + w) / ratio) + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], m
    while j:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


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
