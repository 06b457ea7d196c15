"""The GPU kit (bench/gpu/run.sh) in its CPU dry mode: every step on CPU with tiny shapes, as CI runs
it, so that nothing in the kit first fails on a GPU, where time is scarce. And its bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

RUN = ROOT / "bench" / "gpu" / "run.sh"
RUNNER = ROOT / "bench" / "gpu" / "runner.py"


@pytest.mark.slow
@pytest.mark.timeout(900)  # a whole prepared command of seven steps: ~2.5 min on 2 quiet cores, several x that beside other work
def test_dry_mode_runs_every_step_on_cpu(tmp_path):
    """Behaviour, not speed: every step runs and passes. The kit's own budgets are for a lent GPU's scarce
    minutes; here they are widened (--budget 840, --step-scale 6: over 5x the quiet time) so that a busy
    machine does not cut a step."""
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    r = subprocess.run(["bash", str(RUN), "--plan", "--out", str(tmp_path), "--budget", "840", "--step-scale", "6"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)  # fmt: skip
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    report = json.loads((tmp_path / "gpu-report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["env", "correctness", "train-lora-7b", "train-full-1.5b", "eval-7b", "chat-7b",
                           "train-full-1.5b-liger"]
    assert {s["status"] for s in report["steps"]} == {"ok"}, {k: (s["status"], s["tail"][-800:]) for k, s in steps.items()}
    assert report["mode"].startswith("plan") and report["exit_code"] == 0 and report["budget_s"] == 840
    tests = steps["correctness"]["result"]["tests"]
    assert len(tests) == 13 and "FAILED" not in tests.values(), tests  # 9 + the Qwen3 family: 2 launches, 2 evals
    assert tests["test_eval_on_cuda_float32_equals_cpu"] == tests["test_pt_full_trains_saves_and_loads"] == "PASSED"
    lora = steps["train-lora-7b"]["result"]
    assert lora["figures"]["tokens_per_s"] > 0 and lora["figures"]["steady_tokens_per_s"] > 0
    for name in ("train-lora-7b", "train-full-1.5b"):  # the GPU runs' own recipes, through --dry-run here
        assert "# memory plan" in steps[name]["result"]["plan"], steps[name]["result"]
    ev = steps["eval-7b"]["result"]["figures"]
    # the plain loop stops at its own time budget: however many it scored, they agree with the scorer
    assert 0 < ev["plain_questions"] <= ev["questions"] and ev["ratio"] > 0
    assert ev["max_logit_diff"] <= ev["tolerance"] and ev["scorer"] == "fast"
    chat = steps["chat-7b"]["result"]["figures"]
    assert chat["greedy_equal_generate"] and chat["self_check"] == "passed" and chat["decode_ratio"] > 0
    md = (tmp_path / "gpu-report.md").read_text()
    for heading in ("## 1. Correctness", "## 2. Training speed", "## 3. Eval speed", "## 4. Chat speed"):
        assert heading in md
    assert "every check passed" in r.stdout


@pytest.mark.parametrize("argv, message", [(["--only", "evil"], "--only evil: no such step"),
                                           (["--budget", "0"], "--budget 0 must be positive"),
                                           (["--step-scale", "-1"], "--step-scale -1 must be positive")])
def test_bad_arguments_are_one_line_and_exit_2(argv, message, tmp_path):
    r = subprocess.run([sys.executable, str(RUNNER), "--out", str(tmp_path), *argv], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_without_cuda_and_without_plan_it_says_so_and_stops(tmp_path):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has CUDA")
    r = subprocess.run([sys.executable, str(RUNNER), "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and "no CUDA device visible" in r.stdout, r.stdout + r.stderr
    report = json.loads((tmp_path / "gpu-report.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["error"] + ["not run"] * 6
