"""Token-by-token decoding for chat: the model's KV cache, one token per forward, each token handed to
the caller as soon as it exists.

This is `model.generate` for one sequence, without its per-call set-up (config copies and checks,
model-kwarg validation, processor and stopping-criteria construction: about 1 ms, which is 7% of the
first token of a small model on CPU). The arithmetic is generate's: logits of the last position in
float32, then transformers' own processors in generate's order (repetition penalty, min new tokens;
when sampling temperature, top-k, top-p), then argmax or one torch.multinomial draw per token, so a
seed gives the same tokens as generate with the same settings (tests/test_chat.py checks both).
"""

from __future__ import annotations

import torch

from .hfcompat import cache_kwarg, takes_logits_to_keep

# generate()'s defaults for a setting the model's generation_config leaves unset
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0, "min_new_tokens": 0}


def processors(settings: dict, prompt_len: int, stop_ids: list[int]):
    """transformers' logits processors for these settings, in the order generate() applies them."""
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,  # fmt: skip
    )

    s = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    out = LogitsProcessorList()
    if s["repetition_penalty"] != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(float(s["repetition_penalty"])))
    if s["min_new_tokens"] > 0 and stop_ids:
        out.append(MinNewTokensLengthLogitsProcessor(prompt_len, s["min_new_tokens"], torch.tensor(stop_ids)))
    if s.get("do_sample"):
        if s["temperature"] != 1.0:
            out.append(TemperatureLogitsWarper(float(s["temperature"])))
        if s["top_k"] != 0:
            out.append(TopKLogitsWarper(top_k=s["top_k"]))
        if s["top_p"] < 1.0:
            out.append(TopPLogitsWarper(top_p=float(s["top_p"])))
    return out


def stream(model, input_ids: torch.Tensor, settings: dict, stop_ids: list[int], put, stopped) -> None:
    """Decode after `input_ids` (1, n): put(token_id) for every new token, up to max_new_tokens or a
    stop id (which is put too); `stopped()` is asked after every token. Call under inference_mode."""
    from transformers import DynamicCache

    n = input_ids.shape[1]
    steps = settings["max_new_tokens"]
    chain = processors(settings, n, stop_ids)
    sample = bool(settings.get("do_sample"))
    stop = set(stop_ids)
    # the whole sequence, for the processors that read it (repetition penalty, min new tokens)
    seq = torch.empty((1, n + steps), dtype=torch.long, device=input_ids.device)
    seq[:, :n] = input_ids
    cache = DynamicCache(config=model.config)
    extra = {cache_kwarg(model): cache, **({"logits_to_keep": 1} if takes_logits_to_keep(model) else {})}
    x = input_ids
    for step in range(steps):
        logits = model(input_ids=x, use_cache=True, **extra).logits[:, -1].float()
        if chain:
            logits = chain(seq[:, : n + step], logits)
        token = torch.multinomial(logits.softmax(-1), 1) if sample else logits.argmax(-1, keepdim=True)
        seq[:, n + step] = token[:, 0]
        token_id = token.item()
        put(token_id)
        if token_id in stop or stopped():
            return
        x = token

