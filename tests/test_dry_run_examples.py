"""`sft`/`dpo --dry-run` show the first example of each dataset as the model will see it, trained spans
marked (⟦ ⟧ off a terminal, highlighted on one), and `--dry-run --json` gives the same as data."""

from __future__ import annotations

import json

import pytest

E = "<|im_end|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"


def _cli(capsys, *args) -> tuple[int, str, str]:
    from devops_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _recipe(model, tmp_path, stage="sft", dataset="devops_chat"):
    return [stage, f"model_name_or_path={model}", f"dataset={dataset}", f"output_dir={tmp_path / 'out'}",
            "max_steps=1"]


def test_sft_dry_run_marks_what_is_trained(tiny_arch, tmp_path, capsys):
    code, out, _ = _cli(capsys, *_recipe(tiny_arch("qwen3"), tmp_path), "--dry-run")
    assert code == 0 and not (tmp_path / "out").exists()
    first = json.loads((_bundled("devops_chat.jsonl"))[0])["messages"]
    assert "# example 1/2 of dataset devops_chat's first record (the chat template re-renders earlier turns" in out
    assert f"<|im_start|>assistant\n⟦{EMPTY_THINK}{first[2]['content']}{E}⟧" in out  # turn 1, its own example
    # example 2: turn 1 is history (untrained, no think block), turn 2 trained
    assert f"<|im_start|>assistant\n{first[2]['content']}{E}\n<|im_start|>user\n{first[3]['content']}{E}\n" \
           f"<|im_start|>assistant\n⟦{EMPTY_THINK}{first[4]['content']}{E}⟧" in out


def test_dry_run_json_has_text_and_char_and_token_spans(tiny_arch, tmp_path, capsys):
    from devops_cli.modeling import load_tokenizer

    model = tiny_arch("qwen3")
    code, out, _ = _cli(capsys, *_recipe(model, tmp_path), "enable_thinking=false", "--dry-run", "--json")
    assert code == 0
    report = json.loads(out)  # stdout is the JSON object alone
    assert report["recipe"]["enable_thinking"] is False and report["memory_plan"]["rows"]
    first = json.loads((_bundled("devops_chat.jsonl"))[0])["messages"]
    tok = load_tokenizer(str(model))
    examples = report["examples"]
    assert [e["example"] for e in examples] == [0, 1] and {e["examples_of_record"] for e in examples} == {2}
    for item, answer in zip(examples, (first[2]["content"], first[4]["content"])):
        (a, b), = item["trained_chars"]
        assert item["text"][a:b] == answer + E  # thinking off: the empty block is prompt
        assert item["text"][:a].endswith(f"<|im_start|>assistant\n{EMPTY_THINK}")
        (s, t), = item["trained_tokens"]
        assert tok.decode(item["input_ids"][s:t]) == answer + E and item["trained"] == t - s
        assert tok.decode(item["input_ids"]) == item["text"] and item["tokens"] == len(item["input_ids"])


def test_dpo_dry_run_json_marks_chosen_and_rejected(tiny_arch, tmp_path, capsys):
    code, out, _ = _cli(capsys, *_recipe(tiny_arch("qwen3"), tmp_path, "dpo", "devops_pref"), "finetuning_type=lora",
                        "--dry-run", "--json")
    assert code == 0
    record = json.loads(_bundled("devops_pref.jsonl")[0])
    items = json.loads(out)["examples"]
    assert [i["kind"] for i in items] == ["chosen", "rejected"]
    for item in items:
        (a, b), = item["trained_chars"]
        assert item["text"][a:b] == f"{EMPTY_THINK}{record[item['kind']]}{E}"
        assert item["text"][:a] == f"<|im_start|>user\n{record['instruction']}{E}\n<|im_start|>assistant\n"


def test_enable_thinking_without_a_thinking_template_is_said_and_json_needs_dry_run(tiny_arch, tmp_path, capsys):
    code, out, err = _cli(capsys, *_recipe(tiny_arch("qwen2"), tmp_path), "enable_thinking=false", "--dry-run")
    assert code == 0 and "enable_thinking has no effect: the chat template (auto) of" in err
    assert "⟦" in out
    code, out, err = _cli(capsys, *_recipe(tiny_arch("qwen2"), tmp_path), "--json")
    assert code == 2 and "--json goes with --dry-run" in err and out == ""


def test_on_a_terminal_trained_spans_are_highlighted_not_bracketed():
    import io

    from rich.console import Console

    from devops_cli.train import preview

    buf = io.StringIO()
    item = {"dataset": "d", "example": 0, "examples_of_record": 1, "kind": "sft", "text": "prompt ANSWER<|im_end|>",
            "trained_chars": [[7, 23]], "trained": 3, "tokens": 5, "truncated": False}
    preview.show(Console(file=buf, force_terminal=True, color_system="standard", width=200), [item], [])
    shown = buf.getvalue()
    assert "⟦" not in shown and "highlighted" in shown and "\x1b[1;32mANSWER<|im_end|>" in shown


def _bundled(name: str) -> list[str]:
    from devops_cli.dataset_info import BUNDLED_DIR

    return (BUNDLED_DIR / name).read_text(encoding="utf-8").splitlines()
