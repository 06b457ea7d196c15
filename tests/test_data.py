"""Data: pt packing and its report; sft ChatML rendering, label masks, truncation, formats."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from devops_cli.errors import DevopsError
from devops_cli.train import data, recipe

IGNORE = data.IGNORE


def _recipe(data_dir, **kw):
    values = {"stage": "sft", "model_name_or_path": "m", "dataset": "qa", "dataset_dir": str(data_dir),
              "output_dir": "o", "max_source_length": 512, "max_target_length": 512, **kw}
    return recipe.build(values, {}, "test.yaml")


def test_multi_turn_chatml_label_mask_token_by_token(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Why is my pod in CrashLoopBackOff?"},
                {"role": "assistant", "content": "Run `kubectl logs --previous` to see why it exits."}]  # fmt: skip
    renderer = data.Renderer(tokenizer, "chatml", None)
    input_ids, labels, truncated = data.encode_sft(renderer, messages, 512, 512)
    assert not truncated
    full = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\nWhy is my pod in CrashLoopBackOff?<|im_end|>\n"
            "<|im_start|>assistant\nRun `kubectl logs --previous` to see why it exits.<|im_end|>")  # fmt: skip
    assert tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n") == full
    # the segment-wise encoding equals one joint encoding of the whole conversation
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    assert input_ids == enc["input_ids"]
    # expected mask, derived independently: a token is trained iff it lies inside an answer + <|im_end|>
    spans = []
    for answer in ("Hello!<|im_end|>", "Run `kubectl logs --previous` to see why it exits.<|im_end|>"):
        start = full.index(answer)
        spans.append((start, start + len(answer)))
    expected = [tok if any(a <= s and e <= b for a, b in spans) else IGNORE
                for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]  # fmt: skip
    assert labels == expected
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert [lab for tok, lab in zip(input_ids, labels) if tok == im_start] == [IGNORE] * 5
    assert [lab for tok, lab in zip(input_ids, labels) if tok == im_end] == [IGNORE, IGNORE, im_end, IGNORE, im_end]
    trained = [t for t in labels if t != IGNORE]
    assert tokenizer.decode(trained) == "Hello!<|im_end|>Run `kubectl logs --previous` to see why it exits.<|im_end|>"


def test_system_prompt_from_recipe_and_from_data(tokenizer):
    r = data.Renderer(tokenizer, "chatml", "You are an SRE.")
    ids, labels, _ = data.encode_sft(r, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], 99, 99)
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nYou are an SRE.<|im_end|>")
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ids, _, _ = data.encode_sft(r, own, 99, 99)
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_truncation_keeps_the_answer_and_the_template(tokenizer):
    r = data.Renderer(tokenizer, "chatml", None)
    long_question = "kubectl get pods shows many restarts " * 60
    answer = "Check the liveness probe."
    ids, labels, truncated = data.encode_sft(r, [{"role": "user", "content": long_question},
                                                 {"role": "assistant", "content": answer}], 64, 32)
    assert truncated
    prompt = [t for t, lab in zip(ids, labels) if lab == IGNORE]
    assert len(prompt) == 64
    assert tokenizer.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode([t for t in labels if t != IGNORE]) == answer + "<|im_end|>"
    # an answer longer than max_target_length is cut to it
    ids, labels, truncated = data.encode_sft(r, [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": long_question}], 64, 10)
    assert truncated and sum(lab != IGNORE for lab in labels) == 10
    # later turns that no longer fit the total budget are dropped, the first turn is kept whole
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    ids, labels, truncated = data.encode_sft(r, turns, 40, 20)
    assert truncated and len(ids) <= 60
    assert "answer 0" in tokenizer.decode([t for t in labels if t != IGNORE])


def test_sft_build_formats_and_drops_examples_without_answer(tokenizer, data_dir):
    write_jsonl(data_dir / "qa.jsonl", [
        {"instruction": "What is a Pod?", "input": "", "output": "The smallest unit.", "history": [["Hi", "Hello!"]]},
        {"instruction": "Check disk", "input": "df -h shows 100%", "output": "Delete old logs.", "history": []},
        {"instruction": "Empty answer", "input": "", "output": "", "history": []},
    ])  # fmt: skip
    r = _recipe(data_dir, dataset="qa,chat")
    train, eval_set, report = data.build(r, tokenizer)
    assert eval_set is None
    assert report.examples == 2 + 10 and report.dropped_examples == 1
    texts = [tokenizer.decode(x) for x in train["input_ids"]]
    assert "<|im_start|>user\nCheck disk\ndf -h shows 100%<|im_end|>" in texts[1]  # instruction + "\n" + input
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>" in texts[0]  # history first
    assert "ping?" in texts[2]
    assert report.trained_tokens == sum(sum(t != IGNORE for t in x) for x in train["labels"])


def test_sharegpt_tags_are_mapped(tokenizer, data_dir):
    write_jsonl(data_dir / "sg.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}] * 3)
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["sg"] = {"file_name": "sg.jsonl", "formatting": "sharegpt", "columns": {"messages": "conversations"},
                  "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    train, _, report = data.build(_recipe(data_dir, dataset="sg"), tokenizer)
    assert report.examples == 3
    assert tokenizer.decode([t for t in train["labels"][0] if t != IGNORE]) == "yo<|im_end|>"


def test_pt_packing_blocks_and_report(tokenizer, data_dir):
    r = _recipe(data_dir, stage="pt", dataset="corpus", max_source_length=16)
    train, eval_set, report = data.build(r, tokenizer)
    assert report.examples == 50
    assert report.blocks == len(train) == report.tokens // 16
    assert report.dropped_tokens == report.tokens - 16 * report.blocks < 16
    assert all(len(x) == 16 for x in train["input_ids"]) and train["labels"] == train["input_ids"]
    flat = [t for x in train["input_ids"] for t in x]
    assert flat.count(tokenizer.eos_token_id) >= report.examples - 1  # every document ends with EOS
    # packing efficiency: no padding at all
    assert sum(len(x) for x in train["input_ids"]) == report.trained_tokens


def test_pt_val_split_and_small_corpus(tokenizer, data_dir):
    train, eval_set, _ = data.build(_recipe(data_dir, stage="pt", dataset="corpus", max_source_length=16, val_size=3), tokenizer)
    assert len(eval_set) == 3
    with pytest.raises(DevopsError, match="fewer than one block of max_source_length=100000"):
        data.build(_recipe(data_dir, stage="pt", dataset="corpus", max_source_length=100000), tokenizer)


def test_txt_and_csv_files(tokenizer, data_dir):
    (data_dir / "notes.txt").write_text("line one about nginx\nline two about dns\n" * 20)
    (data_dir / "qa.csv").write_text("instruction,output\nWhat is DNS?,Name resolution.\nWhat is TLS?,Encryption.\n")
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["notes"] = {"file_name": "notes.txt", "stage": "pt"}
    info["qacsv"] = {"file_name": "qa.csv", "columns": {"prompt": "instruction", "response": "output"}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    _, _, report = data.build(_recipe(data_dir, stage="pt", dataset="notes", max_source_length=8), tokenizer)
    assert report.examples == 40 and report.blocks > 0
    train, _, report = data.build(_recipe(data_dir, dataset="qacsv"), tokenizer)
    assert report.examples == 2
