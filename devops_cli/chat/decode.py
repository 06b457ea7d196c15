"""Token-by-token decoding for chat: the model's KV cache, one token per forward, each token handed to
the caller as soon as it exists.

This is `model.generate` for one sequence, without its per-call set-up (config copies and checks,
model-kwarg validation, processor and stopping-criteria construction: about 1 ms, which is 7% of the
first token of a small model on CPU). The arithmetic is generate's: logits of the last position in
float32, then transformers' own processors in generate's order (repetition penalty, min new tokens;
when sampling temperature, top-k, top-p), then argmax or one torch.multinomial draw per token, so a
seed gives the same tokens as generate with the same settings (tests/test_chat.py checks both).

At run time `self_check` decodes a few greedy tokens of a real prompt with this loop and with
`generate` and compares tokens and scores (guard.py's rule); a session whose check fails warns and
decodes with `stream_generate` (generate with a streamer) instead. The sampling warpers are
transformers' own classes applied in generate's order, the same for every seed; the tests pin that
order against generate.
"""

from __future__ import annotations

import torch

from devops_cli.hfcompat import cache_kwarg, takes_logits_to_keep

# generate()'s defaults for a setting the model's generation_config leaves unset
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0, "min_new_tokens": 0}


def processors(settings: dict, prompt_len: int, stop_ids: list[int], device="cpu"):
    """transformers' logits processors for these settings, in the order generate() applies them, with
    their tensors on `device` (the logits')."""
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
        out.append(MinNewTokensLengthLogitsProcessor(prompt_len, s["min_new_tokens"], torch.tensor(stop_ids, device=device)))
    if s.get("do_sample"):
        if s["temperature"] != 1.0:
            out.append(TemperatureLogitsWarper(float(s["temperature"])))
        if s["top_k"] != 0:
            out.append(TopKLogitsWarper(top_k=s["top_k"]))
        if s["top_p"] < 1.0:
            out.append(TopPLogitsWarper(top_p=float(s["top_p"])))
    return out


def stream(model, input_ids: torch.Tensor, settings: dict, stop_ids: list[int], put, stopped, scores=None,
           generator=None) -> None:
    """Decode after `input_ids` (1, n): put(token_id) for every new token, up to max_new_tokens or a
    stop id (which is put too); `stopped()` is asked after every token. `scores`: a list that gets
    every step's processed logits. `generator`: the torch.Generator sampling draws from (default:
    torch's global one). Call under inference_mode."""
    from transformers import DynamicCache

    n = input_ids.shape[1]
    steps = settings["max_new_tokens"]
    chain = processors(settings, n, stop_ids, input_ids.device)
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
        if scores is not None:
            scores.append(logits)
        token = torch.multinomial(logits.softmax(-1), 1, generator=generator) if sample else logits.argmax(-1, keepdim=True)
        seq[:, n + step] = token[:, 0]
        token_id = token.item()
        put(token_id)
        if token_id in stop or stopped():
            return
        x = token



def generation_config(settings: dict, stop_ids: list[int], **extra):
    """The GenerationConfig that makes generate() decode as `stream` does with these settings."""
    from transformers import GenerationConfig

    s = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    sample = bool(s.get("do_sample"))
    return GenerationConfig(max_new_tokens=s["max_new_tokens"], min_new_tokens=s["min_new_tokens"] or None,
                            do_sample=sample, repetition_penalty=float(s["repetition_penalty"]),
                            temperature=float(s["temperature"]) if sample else None,
                            top_k=s["top_k"] if sample else None, top_p=float(s["top_p"]) if sample else None,
                            eos_token_id=list(stop_ids) or None, pad_token_id=(stop_ids or [0])[0], **extra)  # fmt: skip


def stream_generate(model, input_ids: torch.Tensor, settings: dict, stop_ids: list[int], put, stopped) -> None:
    """What `stream` does, through model.generate with a streamer: the plain path, used when this
    loop failed its self-check."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class Put(BaseStreamer):
        prompt = True

        def put(self, value):
            if self.prompt:  # generate hands over the prompt first
                self.prompt = False
                return
            for token_id in value.reshape(-1).tolist():
                put(token_id)

        def end(self):
            pass

    class Stop(StoppingCriteria):
        def __call__(self, ids, scores, **kwargs):
            return torch.full((ids.shape[0],), stopped(), dtype=torch.bool, device=ids.device)

    model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation_config(settings, stop_ids),
                   streamer=Put(), stopping_criteria=StoppingCriteriaList([Stop()]))  # fmt: skip


def self_check(model, input_ids: torch.Tensor, settings: dict, steps: int = 4) -> str | None:
    """Decode `steps` greedy tokens after `input_ids` with `stream` and with generate (the session's
    repetition penalty; no stop ids, so both run all steps): None when tokens and processed scores
    agree (guard.tolerance), else what differs."""
    from devops_cli import guard

    greedy = {**settings, "do_sample": False, "max_new_tokens": steps, "min_new_tokens": 0}
    ours, scores = [], []
    with torch.inference_mode():
        stream(model, input_ids, greedy, [], ours.append, lambda: False, scores)
        config = generation_config(greedy, [], output_scores=True, return_dict_in_generate=True)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    theirs = out.sequences[0, input_ids.shape[1]:].tolist()
    layers = guard.depth(model)
    for step, (a, b) in enumerate(zip(scores, out.scores)):
        b = b.float()
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)):
            return f"step {step + 1}: the processors masked different tokens"
        diff, tol = (a[finite] - b[finite]).abs().max().item(), guard.tolerance(model.dtype, b[finite], layers)
        if not diff <= tol:
            return f"step {step + 1}: max |score diff| {diff:.3g} > {tol:.3g} in {str(model.dtype).removeprefix('torch.')}"
    if ours != theirs:
        return f"tokens {ours} vs generate's {theirs}"
    return None
