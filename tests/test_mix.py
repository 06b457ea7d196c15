"""Several datasets in one run: mix_strategy / interleave_probs (LLaMA-Factory's names) for pt and sft, in
memory and streaming, with the realised proportions by tokens; bad values are one line each."""

from __future__ import annotations

import pytest

from devops_cli.errors import DevopsErrors

COMMON = ["model_name_or_path=x", "output_dir=o", "max_source_length=64"]
PT = ["dataset=devops_corpus_en,devops_corpus_zh", *COMMON]


def _recipe(stage: str, *overrides: str):
    from devops_cli.train.recipe import load

    return load(None, list(overrides), stage=stage)


@pytest.mark.parametrize("overrides, message", [
    (["interleave_probs=0.5,0.5"], "interleave_probs is set but mix_strategy is concat"),
    (["mix_strategy=interleave_under", "interleave_probs=0.5"], "1 value(s) for 2 dataset(s)"),
    (["mix_strategy=interleave_under", "interleave_probs=0.5,0.6"], "must sum to 1"),
    (["mix_strategy=interleave_under", "interleave_probs=1,0"], "must all be > 0"),
    (["mix_strategy=interleave_under", "interleave_probs=a,b"], "comma-separated numbers"),
    (["mix_strategy=shuffle"], "is not one of concat, interleave_under, interleave_over"),
])  # fmt: skip
def test_bad_mix_keys_are_one_line_each(overrides, message):
    with pytest.raises(DevopsErrors) as e:
        _recipe("pt", *PT, *overrides)
    assert len(e.value.errors) == 1 and message in e.value.line()


def test_pt_interleave_reports_token_shares_in_memory_and_streaming(tokenizer):
    from devops_cli.train import data, stream

    asked = ["mix_strategy=interleave_under", "interleave_probs=0.8,0.2"]
    built, _, report = data.build(_recipe("pt", *PT, *asked), tokenizer)
    mix = report.mix
    assert set(mix) == {"devops_corpus_en", "devops_corpus_zh"} and abs(sum(e["share"] for e in mix.values()) - 1) < 1e-3
    assert mix["devops_corpus_en"]["share"] > 0.7  # 80% of the documents; a share of tokens near it
    assert sum(e["tokens"] for e in mix.values()) == report.tokens and "mix by tokens" in report.lines("pt")
    assert "mix_source" not in built.column_names
    concat = data.build(_recipe("pt", *PT), tokenizer)[2].mix
    assert concat["devops_corpus_en"]["share"] < mix["devops_corpus_en"]["share"]  # the mix moved the proportions
    # streaming reads the same stream and counts the same tokens as it goes
    train, _, streamed = stream.build(_recipe("pt", *PT, *asked, "streaming=true", "max_steps=5", "buffer_size=4"), tokenizer)
    assert streamed.mix == {} and sum(1 for _ in train) == len(built)
    assert streamed.mix == mix


def test_sft_interleave_over_repeats_the_smaller_dataset(tokenizer):
    from devops_cli.train import data

    sft = ["dataset=devops_qa,devops_chat", *COMMON, "max_target_length=64"]
    alone = data.build(_recipe("sft", *sft), tokenizer)[2]
    over = data.build(_recipe("sft", *sft, "mix_strategy=interleave_over", "interleave_probs=0.5,0.5"), tokenizer)[2]
    assert over.examples > alone.examples  # devops_chat (41) repeated until devops_qa (262) runs out
    assert 0.3 < over.mix["devops_chat"]["share"] < 0.7 and alone.mix["devops_chat"]["share"] < 0.3
