"""`eval` on the Qwen3 family's tiny models (qwen3, qwen3-moe, qwen3.5 beside qwen2): the fast scorer
equal to the plain path on every architecture (Qwen3.5's linear-attention cache included), its
self-check and fallback on recurrent caches, chat mode decided from the tokenizer and the run, and
thinking off in chat prompts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import SHARED
from devops_cli.eval import prompts
from devops_cli.eval import run as evaluate
from devops_cli.eval.scoring import Scorer, predict
from kit import BUNDLED_EXAM

DATA = SHARED / "data" / "devops-exam"
needs_data = pytest.mark.skipif(not (DATA / "cmmlu").is_dir(), reason=f"exam data not found at {DATA} (../shared)")
ARCHES = ["qwen2", "qwen3", "qwen3-moe", "qwen3.5", "qwen3.5-long-memory"]


@pytest.fixture(scope="module")
def model_of(tiny_arch, tmp_path_factory):
    """model_of(arch) -> a tiny model dir. "qwen3.5-long-memory": the tiny Qwen3.5 with the slow decay
    trained Gated-DeltaNet heads have (A from 1e-3 to 1, dt_bias -2): at init (A ~ U(0.01, 16)) a
    linear-attention layer forgets within a few tokens, so a wrong recurrent state of the prefix would
    change no logit of the question after it and no test could see it."""
    made = {}

    def get(arch: str):
        if arch != "qwen3.5-long-memory":
            return tiny_arch(arch)
        if arch not in made:
            from devops_cli.modeling import load_model

            out = tmp_path_factory.mktemp("long") / "model"
            shutil.copytree(tiny_arch("qwen3.5"), out)
            model = load_model(str(out), torch.float32)
            with torch.no_grad():
                for layer in model.model.layers:
                    if hasattr(layer, "linear_attn"):
                        layer.linear_attn.A_log.copy_(torch.logspace(-3, 0, layer.linear_attn.A_log.numel()).log())
                        layer.linear_attn.dt_bias.fill_(-2.0)
            model.save_pretrained(out)
            made[arch] = out
        return made[arch]

    return get


def plain_logits(model_dir, o: evaluate.EvalOptions, chat: bool):
    """Every question of the run scored the plain way (whole prompt, batch of one)."""
    from devops_cli.modeling import load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    ids, _, _ = evaluate.encode_all(tok, o, evaluate.load_exam(o), chat=chat)
    scorer = Scorer(load_model(str(model_dir), torch.float32).eval(), prompts.option_ids(tok, list("ABCD"), "tiny"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small forwards: one thread avoids OpenMP spin-waits on a busy 2-core box
    try:
        return torch.stack([scorer.reference(x) for x in ids])
    finally:
        torch.set_num_threads(threads)


def run_logits(result) -> torch.Tensor:
    return torch.tensor([q["logits"] for q in result["questions"]])


@needs_data
@pytest.mark.parametrize("arch", ARCHES)
def test_fast_scorer_equals_plain_on_each_arch(model_of, arch):
    """5 shots, the first 3 questions of each subject: the fast path (prefix cache reused, Qwen3.5's
    recurrent states included) gives the plain path's logits and passes its own self-check."""
    model = model_of(arch)
    o = evaluate.EvalOptions(model=str(model), shots=5, data_dir=str(DATA), limit=3, chat=False)
    result = evaluate.run(o)
    assert result["scorer"] == "fast" and result["overall"]["n"] == 18
    reference = plain_logits(model, o, chat=False)
    assert (run_logits(result) - reference).abs().max().item() < 1e-4
    assert predict(reference) == ["ABCD".index(q["predicted"]) for q in result["questions"]]


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("arch", ["qwen3", "qwen3-moe", "qwen3.5-long-memory"])  # qwen2: test_eval_run's
def test_fast_scorer_equals_plain_on_all_574(model_of, arch, tmp_path):
    """The acceptance check: the whole exam at 5 shots through the CLI, chat on as the tokenizer
    decides (thinking off), every question's logits equal to the plain path's."""
    from devops_cli.cli import main

    model, out = model_of(arch), tmp_path / "r.json"
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", str(model), "--shots", "5", "--data-dir", str(DATA), "-o", str(out)])
    assert exit_.value.code in (0, None)
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["overall"]["n"] == 574 and result["scorer"] == "fast"
    assert result["chat"] is True and result["thinking"] == "off"
    o = evaluate.EvalOptions(model=str(model), shots=5, data_dir=str(DATA))
    reference = plain_logits(model, o, chat=True)
    assert (run_logits(result) - reference).abs().max().item() < 1e-4


def test_self_check_covers_recurrent_caches(model_of, monkeypatch, capsys):
    """Qwen3.5: the per-row copies of the prefix's states made wrong (recurrent state zeroed): the run
    warns once, scores the plain way and says so; its logits are the plain path's."""
    from devops_cli.eval import prefix

    model = model_of("qwen3.5-long-memory")
    real = prefix.replicate

    def forgetful(cache, n):
        out = real(cache, n)
        for layer in out.layers:
            for t in getattr(layer, "recurrent_states", {}).values():
                if t is not None:
                    t.zero_()
        return out

    monkeypatch.setattr(prefix, "replicate", forgetful)
    o = evaluate.EvalOptions(model=str(model), shots=3, data_dir=str(BUNDLED_EXAM), subjects="all", chat=False,
                             limit=4)
    result = evaluate.run(o)
    err = capsys.readouterr().err
    assert err.count("failed its self-check") == 1 and "max |logit diff|" in err
    assert result["scorer"].startswith("plain (fast path failed self-check: ")
    reference = plain_logits(model, o, chat=False)
    assert (run_logits(result) - reference).abs().max().item() < 1e-5
    monkeypatch.setattr(prefix, "replicate", real)
    assert evaluate.run(o)["scorer"] == "fast"  # and unbroken, the same run passes its check


@pytest.mark.parametrize("failure", ["unknown layer", "crash"])
def test_fast_path_that_cannot_run_falls_back_in_one_line(tiny_arch, monkeypatch, capsys, failure):
    """A cache layer the scorer does not know, or any exception inside the fast path: one warning,
    the plain path's numbers, never a traceback."""
    from devops_cli.eval import prefix

    def refuse(cache, n):
        if failure == "crash":
            raise AttributeError("'LinearAttentionLayer' object has no attribute 'keys'")
        raise prefix.NotReusable("FutureRecurrentLayer")

    monkeypatch.setattr(prefix, "replicate", refuse)
    model = tiny_arch("qwen3.5")
    o = evaluate.EvalOptions(model=str(model), shots=2, data_dir=str(BUNDLED_EXAM), subjects="all", chat=False,
                             limit=2)
    result = evaluate.run(o)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "Traceback" not in err
    assert ("FutureRecurrentLayer layers" if failure != "crash" else "raised AttributeError") in err
    assert result["scorer"].startswith("plain (fast path failed self-check: ")
    assert (run_logits(result) - plain_logits(model, o, chat=False)).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------------
# Chat mode and thinking
# ------------------------------------------------------------------------------------------------
def decide(model_dir, **kw):
    from devops_cli.modeling import load_tokenizer

    o = evaluate.EvalOptions(model=str(model_dir), **kw)
    return evaluate.chat_default(load_tokenizer(o.adapter or o.model), o)


def test_chat_mode_from_the_tokenizer_not_the_name(tiny_arch, tmp_path):
    """Qwen3's post-trained models are named `Qwen3-8B`: chat on because the tokenizer's eos is the
    template's end of turn; `-Base` names, pt outputs and a Qwen2-style base tokenizer stay off."""
    qwen3, qwen2 = tiny_arch("qwen3"), tiny_arch("qwen2")
    named = tmp_path / "Qwen3-8B"
    shutil.copytree(qwen3, named)
    chat, why = decide(named)
    assert chat and "eos <|im_end|> ends the chat template's assistant turns" in why
    base = tmp_path / "Qwen3-8B-Base"
    shutil.copytree(qwen3, base)
    assert decide(base) == (False, "base model: 'Qwen3-8B-Base' names a base model")
    chat, why = decide(qwen2)  # eos <|endoftext|>: a base model's tokenizer, though it ships ChatML
    assert not chat and why.startswith("base model: the tokenizer's eos <|endoftext|> does not end")
    assert decide(base, chat=True) == (True, "--chat") and decide(named, chat=False) == (False, "--no-chat")
    (named / "recipe.yaml").write_text(_resolved("pt"), encoding="utf-8")
    chat, why = decide(named)
    assert not chat and "stage: pt" in why
    (base / "recipe.yaml").write_text(_resolved("sft"), encoding="utf-8")
    assert decide(base)[0] is True  # an sft output of a base model is a chat model


def _resolved(stage: str) -> str:
    from devops_cli.train.recipe import RESOLVED_MARK

    return f"{RESOLVED_MARK}\nstage: {stage}\n"


def test_chat_prompt_has_thinking_off(tiny_arch):
    """Qwen3's template with enable_thinking=False: the prompt ends after the empty think block, where
    the answer letter goes; the ChatML part still encoded piece by piece (the devops-eval harness)."""
    from devops_cli.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_arch("qwen3")))
    assert prompts.thinking(tok) == "off"
    user = "以下是关于开发运维领域的单项选择题\n问题：x\nA. a\n答案："
    ids = prompts.encode_chat(tok, "you are a helpful assistant", user)
    rendered = tok.apply_chat_template([{"role": "system", "content": "you are a helpful assistant"},
                                        {"role": "user", "content": user}],
                                       add_generation_prompt=True, tokenize=False, enable_thinking=False)  # fmt: skip
    assert tok.decode(ids) == rendered and rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    think, close = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert ids[-len(tok.encode("\n\n</think>\n\n")) - 1] == think and close in ids[-4:]
    # Qwen2's ChatML has no thinking: unchanged, read right after <|im_start|>assistant\n
    tok2 = load_tokenizer(str(tiny_arch("qwen2")))
    assert prompts.thinking(tok2) is None
    assert tok2.decode(prompts.encode_chat(tok2, "s", user)).endswith("<|im_start|>assistant\n")


def test_a_template_that_forces_thinking_is_named(tiny_arch, tmp_path, capsys):
    """A template whose generation prompt opens <think> whatever enable_thinking says (Qwen3's
    Thinking-2507 models): chat scoring would read the first token of the reasoning; the run says so."""
    from devops_cli.templates import QWEN3

    forced = tmp_path / "Qwen3-4B-Thinking-2507"
    shutil.copytree(tiny_arch("qwen3"), forced)
    template = QWEN3.replace("{%- if enable_thinking is defined and enable_thinking is false %}",
                             "{{- '<think>\\n' }}{%- if false %}")
    assert template != QWEN3
    (forced / "chat_template.jinja").write_text(template, encoding="utf-8")
    result = evaluate.run(evaluate.EvalOptions(model=str(forced), data_dir=str(BUNDLED_EXAM), subjects="all", limit=2))
    assert result["chat"] is True and result["thinking"] == "forced"
    assert "opens a thinking block that enable_thinking=False does not close" in capsys.readouterr().err


def test_qwen3_chat_run_states_decision_and_thinking(tiny_arch, capsys):
    model = tiny_arch("qwen3")
    result = evaluate.run(evaluate.EvalOptions(model=str(model), shots=2, data_dir=str(BUNDLED_EXAM), subjects="all"))
    out = capsys.readouterr().out
    assert result["chat"] is True and result["thinking"] == "off" and result["scorer"] == "fast"
    assert "chat on (the tokenizer's eos <|im_end|> ends" in " ".join(out.split())
    assert "thinking off" in out
