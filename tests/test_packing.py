"""Padding-free sft is exact: the per-token losses of examples packed into rows (several examples per
row, a padding segment at a row's end) or into one row equal the same examples run one at a time
(fp32, sdpa and eager), and the start-up self-check catches a packed row whose examples see each other."""

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
@pytest.mark.parametrize("layout", ["rows", "one row"])
def test_packed_losses_equal_one_by_one(attn, layout, tiny_model, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from devops_cli.train import packing

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn).eval()
    model.config.use_cache = False  # as training runs it (run._collator)
    train = _examples(tokenizer)
    examples = [{"input_ids": train[i]["input_ids"], "labels": train[i]["labels"]} for i in range(len(train))]
    pack = packing.collator(tokenizer, True, attn) if layout == "rows" else None
    if layout == "rows":
        assert isinstance(pack, packing.PackedRows)
        batch = pack(examples)
        rows = pack.rows([len(e["input_ids"]) for e in examples])
        assert len(rows) < len(examples) and max(len(r) for r in rows) > 1  # examples do share rows
        assert batch["input_ids"].shape[0] == len(rows)
        assert (batch["input_ids"] == tokenizer.pad_token_id).any()  # and a row ends in padding
    gap, drift = packing.compare(model, examples, pack)
    assert gap <= 1e-5, gap
    assert drift > 100 * max(gap, 1e-7)  # the check means something: examples that see each other drift
    assert packing.self_check(model, train, pack or packing.collator(tokenizer, True, attn)) is None


def test_rows_are_first_fit_decreasing_within_the_longest():
    from devops_cli.train.packing import PackedRows

    # longest first into the first row with room, rows of at most 9 (the longest): 9 | 6+3 | 5+4 | 2
    assert PackedRows(0).rows([5, 9, 3, 4, 2, 6]) == [[1], [5, 2], [0, 3], [4]]
    batch = PackedRows(0)([{"input_ids": [7] * n, "labels": [8] * n} for n in (2, 3, 1)])
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]  # 3 | 2+1, width 3: no padding
    assert batch["labels"].tolist() == [[-100, 8, 8], [-100, 8, -100]]  # each example's first label ignored
    short = PackedRows(0)([{"input_ids": [7] * n, "labels": [8] * n} for n in (4, 2)])
    assert short["input_ids"].tolist() == [[7, 7, 7, 7], [7, 7, 0, 0]]  # padding: a segment of its own
    assert short["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    assert short["labels"].tolist() == [[-100, 8, 8, 8], [-100, 8, -100, -100]]
def test_self_check_catches_examples_that_see_each_other(tiny_model, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from devops_cli.train import packing

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config.use_cache = True  # transformers 5.24 then drops the block mask of a packed row
    why = packing.self_check(model, _examples(tokenizer), packing.collator(tokenizer, True, None))
    assert why is not None and "packed losses differ from one-by-one" in why
