"""Masking on Qwen3's thinking template, checked against the rendered text: every trained span is
exactly an assistant answer as the template renders the last turn (think block included when thinking
is on) with its <|im_end|>, for one- and multi-turn conversations, with and without reasoning,
enable_thinking true and false; each turn of a multi-turn conversation is trained once, with the
history as the template renders it then. The expected texts are written out by hand here."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from devops_cli.errors import DevopsError
from devops_cli.train import data, recipe, render

IGNORE = render.IGNORE
U = "<|im_start|>user\n"
A = "<|im_start|>assistant\n"
E = "<|im_end|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def qwen3_tok(tiny_arch):
    from devops_cli.modeling import load_tokenizer

    return load_tokenizer(str(tiny_arch("qwen3")), "auto")


def _check(tok, input_ids, labels, text, trained):
    """input_ids encode `text` exactly as one joint encoding would (what inference tokenizes), and a token
    is trained iff it lies inside one of the `trained` strings (located in order)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert input_ids == enc["input_ids"]
    spans, at = [], 0
    for piece in trained:
        start = text.index(piece, at)
        spans.append((start, start + len(piece)))
        at = start + len(piece)
    expected = [t if any(a <= s and e <= b for a, b in spans) else IGNORE
                for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    assert labels == expected
    shown, chars, _ = render.spans(tok, input_ids, labels)  # what --dry-run shows
    assert shown == text and [shown[a:b] for a, b in chars] == trained


def _examples(tok, messages, thinking=True, template="auto", max_source=512, max_target=512):
    r = render.Renderer(tok, template, None, thinking)
    return data.encode_examples(r, messages, max_source, max_target)


ONE = [{"role": "user", "content": "Why is my pod Pending?"}, {"role": "assistant", "content": "No node has room."}]
REASONED = [{"role": "user", "content": "Why is my pod Pending?"},
            {"role": "assistant", "content": "<think>\nCheck the scheduler events.\n</think>\n\nNo node has room."}]  # fmt: skip


def test_one_turn_without_reasoning(qwen3_tok):
    (ids, labels, truncated), = _examples(qwen3_tok, ONE, thinking=True)
    text = f"{U}Why is my pod Pending?{E}\n{A}{EMPTY_THINK}No node has room.{E}"
    _check(qwen3_tok, ids, labels, text, [f"{EMPTY_THINK}No node has room.{E}"])  # the empty block is trained
    assert not truncated
    (ids, labels, _), = _examples(qwen3_tok, ONE, thinking=False)
    _check(qwen3_tok, ids, labels, text, [f"No node has room.{E}"])  # same text, the block in the prompt
    prompt = qwen3_tok.apply_chat_template(ONE[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text.startswith(prompt) and prompt.endswith(EMPTY_THINK)  # the prompt inference sends


def test_one_turn_with_reasoning(qwen3_tok):
    (ids, labels, _), = _examples(qwen3_tok, REASONED, thinking=True)
    answer = f"<think>\nCheck the scheduler events.\n</think>\n\nNo node has room.{E}"
    _check(qwen3_tok, ids, labels, f"{U}Why is my pod Pending?{E}\n{A}{answer}", [answer])
    (ids, labels, _), = _examples(qwen3_tok, REASONED, thinking=False)  # reasoning removed
    _check(qwen3_tok, ids, labels, f"{U}Why is my pod Pending?{E}\n{A}{EMPTY_THINK}No node has room.{E}",
           [f"No node has room.{E}"])


MULTI = [
    {"role": "system", "content": "You are an SRE."},
    {"role": "user", "content": "Disk full on node-3."},
    {"role": "assistant", "content": "<think>\nLogs usually.\n</think>\n\nRun du -xh /var."},
    {"role": "user", "content": "It is /var/log/journal."},
    {"role": "assistant", "content": "Vacuum it: journalctl --vacuum-size=500M."},
    {"role": "user", "content": "And to keep it small?"},
    {"role": "assistant", "content": "<think>\nSystemMaxUse.\n</think>\n\nSet SystemMaxUse=500M in journald.conf."},
]  # fmt: skip
SYS = "<|im_start|>system\nYou are an SRE.<|im_end|>\n"
H1 = f"{U}Disk full on node-3.{E}\n{A}"
H2 = f"{U}It is /var/log/journal.{E}\n{A}"
H3 = f"{U}And to keep it small?{E}\n{A}"


@pytest.mark.parametrize("thinking", [True, False])
def test_multi_turn_every_turn_trained_once_with_history_as_rendered_then(qwen3_tok, thinking):
    examples = _examples(qwen3_tok, MULTI, thinking=thinking)
    assert len(examples) == 3  # Qwen3 re-renders earlier turns: one example per assistant turn
    think1 = "<think>\nLogs usually.\n</think>\n\n" if thinking else EMPTY_THINK
    think3 = "<think>\nSystemMaxUse.\n</think>\n\n" if thinking else EMPTY_THINK
    lead = (lambda block: block) if thinking else (lambda block: "")  # thinking off: the block is prompt
    # earlier answers appear without reasoning (as the template renders history), untrained
    texts = [f"{SYS}{H1}{think1}Run du -xh /var.{E}",
             f"{SYS}{H1}Run du -xh /var.{E}\n{H2}{EMPTY_THINK}Vacuum it: journalctl --vacuum-size=500M.{E}",
             f"{SYS}{H1}Run du -xh /var.{E}\n{H2}Vacuum it: journalctl --vacuum-size=500M.{E}\n{H3}{think3}"
             f"Set SystemMaxUse=500M in journald.conf.{E}"]  # fmt: skip
    trained = [f"{lead(think1)}Run du -xh /var.{E}", f"{lead(EMPTY_THINK)}Vacuum it: journalctl --vacuum-size=500M.{E}",
               f"{lead(think3)}Set SystemMaxUse=500M in journald.conf.{E}"]
    for (ids, labels, truncated), text, span in zip(examples, texts, trained):
        assert not truncated
        _check(qwen3_tok, ids, labels, text, [span])
    # each example is what inference renders for that turn: the prompt is the template's own
    for k, (ids, _, _) in enumerate(examples):
        prompt = qwen3_tok.apply_chat_template(MULTI[: 2 + 2 * k], tokenize=False, add_generation_prompt=True,
                                               enable_thinking=thinking)
        assert qwen3_tok.decode(ids).startswith(prompt)


def test_explicit_chatml_on_a_qwen3_tokenizer_is_one_plain_chatml_sequence(tiny_arch):
    from devops_cli.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_arch("qwen3")), "chatml")
    (ids, labels, _), = _examples(tok, MULTI[:5], template="chatml")  # prefix-stable: one sequence
    a1 = f"<think>\nLogs usually.\n</think>\n\nRun du -xh /var.{E}"  # the data's text, as ChatML shows it
    a2 = f"Vacuum it: journalctl --vacuum-size=500M.{E}"
    _check(tok, ids, labels, f"{SYS}{H1}{a1}\n{H2}{a2}", [a1, a2])


def test_qwen2_chatml_stays_one_sequence_per_conversation(tiny_arch):
    from devops_cli.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_arch("qwen2")), "auto")  # its own template is ChatML
    plain = [m if m["role"] != "assistant" else {**m, "content": render.split_reasoning(m["content"])[1]} for m in MULTI]
    (ids, labels, _), = _examples(tok, plain)
    answers = ["Run du -xh /var.", "Vacuum it: journalctl --vacuum-size=500M.", "Set SystemMaxUse=500M in journald.conf."]
    _check(tok, ids, labels, f"{SYS}{H1}{answers[0]}{E}\n{H2}{answers[1]}{E}\n{H3}{answers[2]}{E}",
           [a + E for a in answers])


def test_truncation_per_turn_keeps_the_template_and_drops_turns_that_do_not_fit(qwen3_tok):
    long = [{"role": "user", "content": "kubectl get pods shows restarts " * 60}, {"role": "assistant", "content": "Probe."}]
    (ids, labels, truncated), = _examples(qwen3_tok, long, max_source=64, max_target=32)
    assert truncated and sum(lab == IGNORE for lab in labels) == 64
    assert qwen3_tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE]).endswith(f"{E}\n{A}")
    assert qwen3_tok.decode([t for t in labels if t != IGNORE]) == f"{EMPTY_THINK}Probe.{E}"
    # the third turn's example holds the whole history: over the budget, it is not trained
    examples = _examples(qwen3_tok, MULTI, max_source=40, max_target=30)
    trained = [sum(lab != IGNORE for lab in labels) for _, labels, _ in examples]
    assert trained[0] > 0 and trained[-1] == 0 and examples[-1][2]


def test_sft_build_counts_conversations_and_examples_and_reads_reasoning_content(qwen3_tok, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}] * 3)  # fmt: skip
    (d / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "chat.jsonl", "formatting": "sharegpt",
                                                               "columns": {"messages": "messages"}}}))
    r = recipe.build({"stage": "sft", "model_name_or_path": "m", "dataset": "chat", "dataset_dir": str(d),
                      "output_dir": "o"}, {}, "t.yaml")
    train, _, report = data.build(r, qwen3_tok)
    assert (report.conversations, report.examples) == (3, 6)
    assert "3 conversations -> 6 examples kept" in report.lines("sft")
    first = [t for t in train["labels"][0] if t != IGNORE]
    assert qwen3_tok.decode(first) == f"<think>\nr1\n</think>\n\na1{E}"  # reasoning_content trained as a think block


@pytest.mark.parametrize("thinking", [True, False])
def test_dpo_prompt_chosen_rejected_follow_the_same_rule(qwen3_tok, tmp_path, thinking):
    d = tmp_path / "d"
    d.mkdir()
    history = [{"role": "user", "content": "disk full?"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\ndf -h"},
               {"role": "user", "content": "then?"}]  # fmt: skip
    write_jsonl(d / "sg.jsonl", [{"messages": history, "chosen": {"role": "assistant", "content": "du -xh /var"},
                                  "rejected": {"role": "assistant", "content": "reboot"}}] * 2)
    (d / "dataset_info.json").write_text(json.dumps({"sg": {"file_name": "sg.jsonl", "ranking": True, "formatting": "sharegpt",
                                                            "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"}}}))
    r = recipe.build({"stage": "dpo", "model_name_or_path": "m", "dataset": "sg", "dataset_dir": str(d), "output_dir": "o",
                      "enable_thinking": thinking}, {}, "t.yaml")
    out, report = data.build_preferences(data.load_all(r, None), qwen3_tok, r)
    assert report.examples == 2
    prompt = qwen3_tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    assert prompt == f"{U}disk full?{E}\n{A}df -h{E}\n{U}then?{E}\n{A}" + ("" if thinking else EMPTY_THINK)
    row = out[0]
    assert row["prompt_ids"] == qwen3_tok(prompt, add_special_tokens=False)["input_ids"]
    lead = EMPTY_THINK if thinking else ""
    assert qwen3_tok.decode(row["chosen_ids"]) == f"{lead}du -xh /var{E}"
    assert qwen3_tok.decode(row["rejected_ids"]) == f"{lead}reboot{E}"


def test_a_template_whose_answer_does_not_follow_its_prompt_is_one_line(qwen3_tok):
    import copy

    tok = copy.deepcopy(qwen3_tok)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant (answer now): ' }}{% endif %}")
    with pytest.raises(DevopsError, match="renders assistant turn 1 differently from its generation prompt"):
        _examples(tok, ONE)


def test_template_and_enable_thinking_keys():
    base = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o"}
    r = recipe.build({**base, "stage": "sft"}, {}, "t.yaml")
    assert (r.template, r.enable_thinking) == ("auto", True)
    with pytest.raises(DevopsError, match="template: 'qwen3' is not one of auto, chatml, default"):
        recipe.build({**base, "stage": "sft", "template": "qwen3"}, {}, "t.yaml")
    with pytest.raises(DevopsError, match="enable_thinking is set but stage is pt"):
        recipe.build({**base, "stage": "pt", "enable_thinking": False}, {"enable_thinking": "t.yaml:3"}, "t.yaml")


def test_a_run_written_before_enable_thinking_existed_still_resumes(tmp_path):
    from devops_cli.train import checks

    values = {"stage": "sft", "model_name_or_path": "m", "dataset": "d", "output_dir": str(tmp_path / "o"),
              "template": "chatml"}
    r = recipe.build(values, {}, "t.yaml")
    (tmp_path / "o").mkdir()
    old = recipe.dump(r).replace("enable_thinking: true\n", "")  # as an older devops-model wrote it
    assert "enable_thinking" in recipe.dump(r) and "enable_thinking" not in old
    (tmp_path / "o" / "recipe.yaml").write_text(old)
    assert checks.resume_decision(r) is None  # the same run (no checkpoint yet), not "another run"
    with pytest.raises(DevopsError, match="holds another run"):
        checks.resume_decision(recipe.build({**values, "enable_thinking": False}, {}, "t.yaml"))
