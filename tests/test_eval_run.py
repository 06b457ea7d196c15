"""`devops-model eval` on the tiny model: the whole 574-question exam at 0 and 5 shots, batched scoring
equal to one-question-at-a-time scoring, every protocol, chat mode, and the scorer on hand-made logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SHARED, run_main
from devops_cli.eval import prompts
from devops_cli.eval import run as evaluate
from devops_cli.eval.scoring import Scorer, common_prefix, plan, predict
from kit import BUNDLED_EXAM

DATA = SHARED / "data" / "devops-exam"
needs_data = pytest.mark.skipif(not (DATA / "cmmlu").is_dir(), reason=f"exam data not found at {DATA} (../shared)")


def test_scorer_on_hand_made_logits():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5],  # B
                           [3.0, 3.0, 1.0, 3.0],  # tie A/B/D: the first (strict '>' in A..D order)
                           [-5.0, -4.0, -3.0, -2.0],  # D
                           [1.0, 1.0, 1.5, 1.5]])  # tie C/D -> C  # fmt: skip
    assert predict(logits) == [1, 0, 3, 2]
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_prefix([[1, 2], [1, 2]]) == 1  # each prompt keeps at least one token of its own
    groups = plan([[7, 8, 1], [7, 8, 2, 3], [5, 1]], ["a", "a", "b"])
    assert [(g.prefix, g.members) for g in groups] == [([7, 8], [(0, [1]), (1, [2, 3])]), ([5], [(2, [1])])]



@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "mistral-sliding"])
def test_scorer_equals_reference_on_other_architectures(arch):
    """The last-token-only last layer (own query/attention path for Qwen2, Llama, Qwen3 incl. its q/k
    norms; the model's attention for a sliding window) against whole prompts scored alone."""
    import transformers

    kinds = {"qwen2": "Qwen2", "llama": "Llama", "qwen3": "Qwen3", "mistral-sliding": "Mistral"}
    config_class = getattr(transformers, f"{kinds[arch]}Config")
    model_class = getattr(transformers, f"{kinds[arch]}ForCausalLM")
    extra = {"sliding_window": 24} if arch == "mistral-sliding" else {}
    config = config_class(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, **extra)
    torch.manual_seed(0)
    model = model_class(config).eval()
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(5, 97, (20,), generator=g).tolist()
    prompts_ = [shared + torch.randint(5, 97, (n,), generator=g).tolist() for n in (1, 3, 9, 4, 12)]
    prompts_ += [torch.randint(5, 97, (n,), generator=g).tolist() for n in (6, 2)]  # a group of its own each
    keys = ["few-shot"] * 5 + ["x", "y"]
    scorer = Scorer(model, [5, 6, 7, 8])
    reference = torch.stack([scorer.reference(p) for p in prompts_])
    for batch_size in (None, 2):
        got = scorer.score(prompts_, keys, batch_size, check=False)  # the fast path itself, no fallback
        assert (got - reference).abs().max().item() < 1e-4
def test_summary_is_micro_overall_and_macro(tmp_path):
    from devops_cli.eval.exam import Subject

    o = evaluate.EvalOptions(model="m", shots=5)
    subjects = [Subject("a", "cmmlu", "甲"), Subject("b", "ceval", "乙")]
    records = ([{"subject": "a", "correct": c} for c in (True, True, True, False)]
               + [{"subject": "b", "correct": c} for c in (False, True)])  # fmt: skip
    r = evaluate.summarise(o, subjects, records, False, "why", None, ["A"], "cpu", "float32", None, "fast", {})
    assert r["subjects"]["a"]["accuracy"] == 75.0 and r["subjects"]["b"]["accuracy"] == 50.0
    assert r["overall"]["accuracy_micro"] == pytest.approx(400 / 6) and r["overall"]["accuracy_macro"] == 62.5


def test_eval_module_does_not_import_torch():
    code = "import sys\nimport devops_cli.eval.command, devops_cli.eval.run\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def five_shot(tiny_model, tmp_path_factory):
    if not (DATA / "cmmlu").is_dir():
        pytest.skip(f"exam data not found at {DATA} (../shared)")
    out = tmp_path_factory.mktemp("eval") / "r5.json"
    r = run_main("eval", "--model", str(tiny_model), "--shots", "5", "--data-dir", str(DATA), "--output", str(out))
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text(encoding="utf-8")), r.stdout


@pytest.mark.slow
def test_cli_scores_all_574_at_five_shots(five_shot):
    result, stdout = five_shot
    assert result["overall"]["n"] == 574 and len(result["questions"]) == 574
    assert result["protocol"] == "devops-eval" and result["shots"] == 5 and result["chat"] is False
    assert [v["n"] for v in result["subjects"].values()] == [204, 171, 122, 37, 21, 19]
    q = result["questions"][0]
    assert set(q) == {"subject", "id", "gold", "predicted", "correct", "logits"} and len(q["logits"]) == 4
    assert q["predicted"] == "ABCD"[predict(torch.tensor([q["logits"]]))[0]]
    correct = sum(x["correct"] for x in result["questions"])
    assert result["overall"]["correct"] == correct
    assert result["overall"]["accuracy_micro"] == pytest.approx(100 * correct / 574)
    assert {"torch", "transformers"} <= set(result["versions"]) and result["timings"]["score_s"] > 0
    assert "overall (micro)" in stdout and f"{correct}/574 correct" in stdout


@pytest.mark.slow
def test_batched_equals_one_at_a_time_for_all_574(five_shot, tiny_model):
    """The prefix-cached, batched, padded path against whole prompts scored alone (full logits)."""
    from devops_cli.modeling import load_model, load_tokenizer

    result, _ = five_shot
    o = evaluate.EvalOptions(model=str(tiny_model), shots=5, data_dir=str(DATA))
    tok = load_tokenizer(str(tiny_model))
    ids, keys, records = evaluate.encode_all(tok, o, evaluate.load_exam(o), chat=False)
    assert [(r["subject"], r["id"]) for r in records] == [(q["subject"], q["id"]) for q in result["questions"]]
    assert ids[0] == tok.encode(records[0]["text"])
    model = load_model(str(tiny_model), torch.float32).eval()
    scorer = Scorer(model, prompts.option_ids(tok, ["A", "B", "C", "D"], "tiny"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 574 small forwards: one thread avoids OpenMP spin-waits on a busy 2-core box
    try:
        reference = torch.stack([scorer.reference(x) for x in ids])
    finally:
        torch.set_num_threads(threads)
    batched = torch.tensor([q["logits"] for q in result["questions"]])
    assert result["scorer"] == "fast"  # the fast path passed its own self-check (no plain fallback)
    assert (reference - batched).abs().max().item() < 1e-3
    assert predict(reference) == ["ABCD".index(q["predicted"]) for q in result["questions"]]
    # and a fixed small batch size (other padding, other batch shapes) gives the same
    again = scorer.score(ids[:60], keys[:60], batch_size=7, check=False)
    assert (again - reference[:60]).abs().max().item() < 1e-3


@pytest.mark.slow
@needs_data
def test_cli_zero_shot_scores_all_574(tiny_model, tmp_path):
    out = tmp_path / "r0.json"
    r = run_main("eval", "--model", str(tiny_model), "--shots", "0", "--data-dir", str(DATA), "-o", str(out),
                "--batch-size", "16")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["shots"] == 0 and result["overall"]["n"] == 574 and result["batch_size"] == 16


@needs_data
@pytest.mark.parametrize("protocol", ["cmmlu", "ceval", "lm-eval"])
def test_every_protocol_runs(tiny_model, protocol):
    o = evaluate.EvalOptions(model=str(tiny_model), shots=5, data_dir=str(DATA), protocol=protocol, limit=15)
    result = evaluate.run(o)
    assert result["overall"]["n"] == 6 * 15 and result["protocol"] == protocol
    assert result["options_scored"] == (["A", "B", "C", "D"] if protocol != "lm-eval" else [" A", " B", " C", " D"])


def test_chat_mode_on_the_bundled_exam(tiny_model, tmp_path):
    """--chat: ChatML built piece by piece; batched still equals one at a time."""
    from devops_cli.modeling import load_model, load_tokenizer

    o = evaluate.EvalOptions(model=str(tiny_model), shots=3, data_dir=str(BUNDLED_EXAM), subjects="all", chat=True)
    result = evaluate.run(o)
    assert result["chat"] is True and result["system"] == "you are a helpful assistant"
    assert result["scorer"] == "fast"
    assert result["overall"]["n"] == 22
    tok = load_tokenizer(str(tiny_model))
    ids, _, _ = evaluate.encode_all(tok, o, evaluate.load_exam(o), chat=True)
    model = load_model(str(tiny_model), torch.float32).eval()
    scorer = Scorer(model, prompts.option_ids(tok, ["A", "B", "C", "D"], "tiny"))
    reference = torch.stack([scorer.reference(x) for x in ids])
    assert (reference - torch.tensor([q["logits"] for q in result["questions"]])).abs().max().item() < 1e-3
    # the default for a base model is off, and says why
    off = evaluate.run(evaluate.EvalOptions(model=str(tiny_model), data_dir=str(BUNDLED_EXAM), subjects="all"))
    assert off["chat"] is False and "base model" in off["chat_reason"]


def test_self_check_catches_a_broken_fast_path(tiny_model, monkeypatch, capsys):
    """The last-layer shortcut made to drop the shared prefix (what transformers 5.24's cache rename did
    to it): the run warns once naming the transformers release, scores with the plain path, says so in
    its result, and its logits are the plain forward's."""
    import transformers

    from devops_cli.eval import scoring
    from devops_cli.modeling import load_model, load_tokenizer

    real = scoring._LastTokenLayer._last_query
    monkeypatch.setattr(scoring._LastTokenLayer, "_last_query",
                        lambda self, x, rows, pe, cache: real(self, x, rows, pe, None))  # fmt: skip
    o = evaluate.EvalOptions(model=str(tiny_model), shots=3, data_dir=str(BUNDLED_EXAM), subjects="all")
    result = evaluate.run(o)
    err = capsys.readouterr().err
    assert err.count("failed its self-check") == 1 and f"transformers {transformers.__version__}" in err
    assert result["scorer"].startswith("plain (fast path failed self-check: ")
    tok = load_tokenizer(str(tiny_model))
    ids, keys, _ = evaluate.encode_all(tok, o, evaluate.load_exam(o), chat=False)
    scorer = Scorer(load_model(str(tiny_model), torch.float32).eval(), prompts.option_ids(tok, list("ABCD"), "tiny"))
    reference = torch.stack([scorer.reference(x) for x in ids])
    assert (reference - torch.tensor([q["logits"] for q in result["questions"]])).abs().max().item() < 1e-5
    # and the broken path really is wrong: without the check it would have been returned
    broken = scorer.score(ids, keys, check=False)
    assert (broken - reference).abs().max().item() > 1e-2
