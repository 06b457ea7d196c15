"""serve's per-sequence attention (serve/attention.py) against transformers' packed sdpa: on the calls
continuous batching makes (a real engine on the tiny model), on made-up packed calls, and its
self-check: a wrong result is caught, warned once, and transformers' sdpa serves from then on."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from devops_cli.serve import attention


class Module(torch.nn.Module):  # what sdpa reads of an attention layer
    num_key_value_groups = 2
    layer_type = "full_attention"


def packed_call(lengths: list[tuple[int, int]], seed: int = 0):
    """A call as continuous batching makes it: sequences of (queries, keys) packed in one row, a
    block-diagonal causal mask (bottom-right aligned, as a sequence's new tokens follow its cache)."""
    g = torch.Generator().manual_seed(seed)
    cu_q, cu_k = [0], [0]
    for q, k in lengths:
        cu_q.append(cu_q[-1] + q)
        cu_k.append(cu_k[-1] + k)
    query = torch.randn(1, 4, cu_q[-1], 16, generator=g)
    key, value = torch.randn(2, 1, 2, cu_k[-1], 16, generator=g)
    mask = torch.full((1, 1, cu_q[-1], cu_k[-1]), torch.finfo(torch.float32).min)
    for i, (q, k) in enumerate(lengths):
        block = mask[..., cu_q[i]:cu_q[i + 1], cu_k[i]:cu_k[i + 1]]
        block.copy_(torch.triu(torch.full((q, k), torch.finfo(torch.float32).min), diagonal=k - q + 1))
    kwargs = {"cu_seq_lens_q": torch.tensor(cu_q, dtype=torch.int32), "cu_seq_lens_k": torch.tensor(cu_k, dtype=torch.int32),
              "read_index": [], "write_index": [], "is_causal": False}
    return query, key, value, mask, kwargs


@pytest.mark.parametrize("lengths", [[(1, 40), (1, 7), (1, 90)], [(5, 5), (1, 30), (12, 50)], [(1, 3), (0, 9), (2, 2)]])
def test_the_packed_calls_result(lengths):
    query, key, value, mask, kwargs = packed_call(lengths)
    module = Module().eval()
    ours = attention.PerSequence(sdpa_attention_forward)
    out, _ = ours(module, query, key, value, mask, scaling=0.25, **kwargs)
    plain, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25, **kwargs)
    assert out.shape == plain.shape
    assert (out - plain).abs().max() < 1e-5
    kind = "decode" if all(q == 1 for q, _ in lengths) else "prefill"
    assert ours.checks[kind] == attention.CHECKS - 1 and not ours.plain_only


def test_calls_that_are_not_batched_go_to_sdpa_untouched():
    query, key, value, mask, kwargs = packed_call([(3, 3)])
    module = Module().eval()
    calls = []

    def plain(*args, **kw):
        calls.append(kw)
        return sdpa_attention_forward(*args, **kw)

    ours = attention.PerSequence(plain)
    ours(module, query, key, value, mask, scaling=0.25, **kwargs)  # one sequence: the same work packed
    ours(module, query, key, value, mask, scaling=0.25)  # a plain forward: no cu_seq_lens
    assert len(calls) == 2 and ours.checks == {"decode": attention.CHECKS, "prefill": attention.CHECKS}


def test_a_wrong_result_is_caught_and_sdpa_serves_on(monkeypatch, capfd):
    query, key, value, mask, kwargs = packed_call([(1, 20), (1, 30)])
    module = Module().eval()
    ours = attention.PerSequence(sdpa_attention_forward)
    plain, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25, **kwargs)
    right = attention.attend
    monkeypatch.setattr(attention, "attend", lambda *a: right(*a).flip(1))  # the sequences' rows swapped
    out, _ = ours(module, query, key, value, mask, scaling=0.25, **kwargs)
    assert torch.equal(out, plain) and ours.plain_only
    assert "per-sequence attention failed its self-check" in capfd.readouterr().err
    out, _ = ours(module, query, key, value, mask, scaling=0.25, **kwargs)
    assert torch.equal(out, plain)
    assert capfd.readouterr().err == ""  # said once


def test_the_engine_batches_through_it_and_agrees_with_each_alone(tiny_model):
    """Three greedy requests of different lengths at once through the real engine equal each alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from devops_cli.serve.engine import BatchingEngine, Job

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts = [tok(t)["input_ids"] for t in ("kubectl get pods -A", "How do I find why nginx returns 502 after a "
                                             "deploy? The upstream is a gunicorn app.", "df -h")]

    async def main():
        engine = BatchingEngine(model, [tok.eos_token_id], 4)
        try:
            async def one(ids):
                out = []
                async for tokens in engine.stream(Job(ids, 12)):
                    out += tokens
                return out

            alone = [await one(ids) for ids in prompts]
            together = await asyncio.gather(*(one(ids) for ids in prompts))
            return engine.name, alone, together
        finally:
            engine.close()

    name, alone, together = asyncio.run(main())
    assert "attention per sequence" in name
    assert together == alone and all(len(t) == 12 for t in alone)
    used = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert isinstance(used, attention.PerSequence) and not used.plain_only
    assert used.checks["decode"] < attention.CHECKS and used.checks["prefill"] < attention.CHECKS  # both kinds seen
