"""Padding-free sft is exact: the per-token losses of examples packed into one row equal the same
examples run one at a time (fp32, sdpa and eager), and the start-up self-check catches a packed row
whose examples see each other."""

from __future__ import annotations

import pytest


def _examples(tokenizer):
    import datasets

    from devops_cli.train import data
    from devops_cli.train.recipe import load

    r = load(None, ["model_name_or_path=x", "dataset=devops_qa", "output_dir=o"], stage="sft")
    train, _ = data.build_sft(data.load_all(r, None).select(range(6)), tokenizer, r)
    assert isinstance(train, datasets.Dataset) and len(train) == 6
    return train


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_one_by_one(attn, tiny_model, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from devops_cli.train import packing

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn).eval()
    model.config.use_cache = False  # as training runs it (run._padding_free)
    train = _examples(tokenizer)
    examples = [{"input_ids": train[i]["input_ids"], "labels": train[i]["labels"]} for i in range(len(train))]
    gap, drift = packing.compare(model, examples)
    assert gap <= 1e-5, gap
    assert drift > 100 * max(gap, 1e-7)  # the check means something: examples that see each other drift
    assert packing.self_check(model, train, attn) is None


def test_self_check_catches_examples_that_see_each_other(tiny_model, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from devops_cli.train import packing

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config.use_cache = True  # transformers 5.24 then drops the block mask of a packed row
    why = packing.self_check(model, _examples(tokenizer), None)
    assert why is not None and "packed losses differ from one-by-one" in why
