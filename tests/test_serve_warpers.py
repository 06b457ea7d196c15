"""serve's top-k/top-p warpers (serve/warpers.py) against transformers' own, on a real model's logits,
and their self-checks: a wrong fast path is caught when installed and on a live batch, and
transformers' warpers take over with one warning."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from devops_cli.serve import warpers

SETTINGS = [(1, 1.0), (0, 1.0), (20, 0.8), (50, 0.95), (50, 1.0), (3, 0.5), (7, 0.999), (2, 0.3), (100, 0.9)]


def plain_pair():
    return (ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(50, min_tokens_to_keep=1)),
            ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(0.9, min_tokens_to_keep=1)))


@pytest.fixture(scope="module")
def logits(tiny_model):
    """Next-token logits of the tiny model after a few prompts, in float32 and from bfloat16 (ties)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    texts = ["kubectl get pods", "How do I restart nginx?", "docker build -t app .", "SELECT 1;", "hello",
             "systemctl status", "git rebase -i", "terraform plan", "Why is my disk full?"]
    assert len(texts) == len(SETTINGS)
    with torch.inference_mode():
        rows = [model(**tok(text, return_tensors="pt")).logits[0, -1] for text in texts]
    return torch.stack(rows) * 20  # sharp, like a trained model's


@pytest.mark.parametrize("source", ["float32", "bfloat16", "cold"])
def test_the_same_tokens_as_transformers_warpers(logits, source):
    scores = {"float32": logits, "bfloat16": logits.bfloat16().float(), "cold": logits / 0.05}[source]
    vocab = scores.size(-1)
    k = torch.tensor([k or vocab for k, _ in SETTINGS], dtype=torch.int32)
    p = torch.tensor([p for _, p in SETTINGS], dtype=torch.float32)
    plain_k, plain_p = plain_pair()

    ours_k, theirs_k = warpers.top_k(scores, k, float("-inf")), plain_k(scores, k)
    assert torch.equal(ours_k, theirs_k)  # to the bit
    assert (torch.isfinite(ours_k).sum(-1) >= torch.minimum(k, torch.tensor(vocab))).all()

    ours_p = warpers.top_p(ours_k, p, float("-inf"), 1)
    theirs_p = plain_p(theirs_k, p.view(torch.int32))
    assert ours_p is not None
    assert warpers.differs(ours_p, theirs_p) is None
    kept = torch.isfinite(ours_p).sum(-1)
    assert kept[0] >= 1 and kept[5] < kept[1]  # greedy keeps its ties; top_p 0.5 cuts


def test_nothing_to_do_is_nothing_done(logits):
    vocab = logits.size(-1)
    off_k = torch.full((logits.size(0),), vocab, dtype=torch.int32)
    assert warpers.top_k(logits, off_k, float("-inf")) is logits
    assert warpers.top_p(logits, torch.ones(logits.size(0)), float("-inf"), 1) is logits
    # a top_p < 1 on a row top-k did not cut needs the full sort: transformers' warper does it
    p = torch.ones(logits.size(0))
    p[2] = 0.9
    assert warpers.top_p(logits, p, float("-inf"), 1) is None


def test_differs_names_a_real_difference(logits):
    k = torch.full((logits.size(0),), 5, dtype=torch.int32)
    right = warpers.top_k(logits, k, float("-inf"))
    wrong = warpers.top_k(logits, k + 1, float("-inf"))
    assert "kept 6 tokens" in warpers.differs(wrong, right)
    scaled = right.clone()
    scaled[0] = scaled[0] * 1.01
    assert "probabilities differ" in warpers.differs(scaled, right)


def manager(tiny_model):
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=8)
    made = model.init_continuous_batching(generation_config=config, continuous_batching_config=ContinuousBatchingConfig(
        per_request_processors=True, max_requests_per_batch=2, num_blocks=4, page_size=256, max_batch_tokens=256))
    return made, model.config.vocab_size


def test_installed_in_the_manager_after_its_check(tiny_model):
    made, vocab = manager(tiny_model)
    said = warpers.install(made, vocab, torch.device("cpu"))
    assert said.startswith("top-k/top-p without full sorts")
    kinds = [type(p) for p in made.logit_processor.logits_processor]
    assert warpers.TopK in kinds and warpers.TopP in kinds


def test_a_wrong_fast_path_is_refused_when_installed(tiny_model, monkeypatch, capfd):
    made, vocab = manager(tiny_model)
    right = warpers.top_k
    monkeypatch.setattr(warpers, "top_k", lambda scores, k, fill: right(scores, k + 1, fill))  # one token too many
    said = warpers.install(made, vocab, torch.device("cpu"))
    assert said.startswith("plain (top-k/top-p without full sorts failed self-check")
    kinds = [type(p) for p in made.logit_processor.logits_processor]
    assert ContinuousBatchingTopKLogitsWarper in kinds and warpers.TopK not in kinds
    assert "failed its self-check" in capfd.readouterr().err


def test_a_live_disagreement_hands_over_to_transformers(logits, monkeypatch, capfd):
    plain_k, _ = plain_pair()
    ours = warpers.TopK(plain_k)
    k = torch.full((logits.size(0),), 4, dtype=torch.int32)
    expected = plain_k(logits, k)
    assert torch.equal(ours(logits, k), expected) and not ours.plain_only  # checked, agreed
    right = warpers.top_k
    monkeypatch.setattr(warpers, "top_k", lambda scores, kk, fill: right(scores, kk + 1, fill))
    assert torch.equal(ours(logits, k), expected)  # the live check caught it: transformers' result
    assert ours.plain_only
    err = capfd.readouterr().err
    assert "top-k warper failed its self-check" in err and "transformers" in err
    assert torch.equal(ours(logits, k), expected)  # and from then on, transformers' warper
    assert capfd.readouterr().err == ""  # warned once


def test_after_its_live_checks_it_trusts_itself(logits, monkeypatch):
    plain_k, _ = plain_pair()
    ours = warpers.TopK(plain_k)
    k = torch.full((logits.size(0),), 4, dtype=torch.int32)
    calls = []
    original = ContinuousBatchingTopKLogitsWarper.__call__
    monkeypatch.setattr(ContinuousBatchingTopKLogitsWarper, "__call__", lambda *a: calls.append(1) or original(*a))
    for _ in range(warpers.LIVE_CHECKS + 5):
        ours(logits, k)
    assert len(calls) == warpers.LIVE_CHECKS  # the plain sort ran only for the checks


def test_a_no_op_spends_no_check(logits, monkeypatch):
    """A batch that turns top-k off returns its input: nothing to compare, no sort."""
    plain_k, _ = plain_pair()
    ours = warpers.TopK(plain_k)
    off = torch.full((logits.size(0),), logits.size(-1), dtype=torch.int32)
    calls = []
    original = ContinuousBatchingTopKLogitsWarper.__call__
    monkeypatch.setattr(ContinuousBatchingTopKLogitsWarper, "__call__", lambda *a: calls.append(1) or original(*a))
    for _ in range(5):
        assert ours(logits, off) is logits
    assert calls == [] and ours.checks == warpers.LIVE_CHECKS
