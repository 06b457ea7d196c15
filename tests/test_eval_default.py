"""`devops-model eval --shots 5` as a new user types it: no --model (the newest finished run under runs/,
by the run's own record), no --data-dir (the hub, or the workspace's copy of the exam when the hub
cannot be reached), each said in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, run_main
from devops_cli.errors import DevopsError
from devops_cli.eval import run as evaluate
from devops_cli.train import recipe
from kit import BUNDLED_EXAM


def finished_run(folder: Path, stage: str, finished_at: float) -> None:
    r = recipe.load(None, [f"stage={stage}", "model_name_or_path=base", "dataset=devops_qa", f"output_dir={folder}"])
    (folder / "recipe.yaml").write_text(recipe.dump(r, "a test's run"))
    (folder / "metrics.json").write_text(json.dumps({"global_step": 1, "finished_at": finished_at}))


@pytest.fixture
def workspace(tiny_model, tmp_path):
    """runs/older: a full pt model; runs/newer/sft: a LoRA adapter on runs/older, finished later."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    older = tmp_path / "runs" / "older"
    shutil.copytree(tiny_model, older)
    finished_run(older, "pt", 1000.0)
    adapter = tmp_path / "runs" / "newer" / "sft"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(older, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))  # fmt: skip
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "runs/older"}))
    finished_run(adapter, "sft", 2000.0)
    os.utime(older / "metrics.json", (3000, 3000))  # newest by mtime, older by the runs' own record
    os.utime(adapter / "metrics.json", (1500, 1500))
    return tmp_path


def test_no_model_evaluates_the_newest_run_and_names_it(workspace):
    r = run_main("eval", "--shots", "0", "--data-dir", str(BUNDLED_EXAM), "--subjects", "all", "--output", "r.json",
                cwd=workspace)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "no --model: evaluating runs/newer/sft (LoRA on runs/older), the newest run; pass --model to choose" in r.stdout
    result = json.loads((workspace / "r.json").read_text())
    assert result["model"] == "runs/older" and result["adapter"] == "runs/newer/sft" and result["chat"] is True


def test_no_model_and_no_run_is_one_line(tmp_path):
    r = run_main("eval", "--shots", "5", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("error: --model: no --model given, and no finished training run under runs/ — pass "
                                "--model PATH_OR_HUB_ID (or train one: devops-model sft RECIPE)")


def test_no_data_dir_and_no_hub(monkeypatch, capsys, tiny_model):
    """Before the model loads: the workspace's copy when there is one (said so), else one line."""
    monkeypatch.setattr(evaluate, "hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    o = evaluate.EvalOptions(model=str(tiny_model), shots=5)
    monkeypatch.setattr(evaluate, "LOCAL_EXAM", (Path("/no/such/exam"), BUNDLED_EXAM))
    assert evaluate.exam_dir(o) == str(BUNDLED_EXAM)
    assert f"no --data-dir and the hub cannot be reached: using the exam at {BUNDLED_EXAM}" in capsys.readouterr().out
    monkeypatch.setattr(evaluate, "LOCAL_EXAM", (Path("/no/such/exam"),))
    with pytest.raises(DevopsError) as e:
        evaluate.exam_dir(o)
    assert e.value.line().startswith("--data-dir: no --data-dir, and the Hugging Face hub cannot be reached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # "0" is online, as huggingface_hub reads it: still the one line
    with pytest.raises(DevopsError):
        evaluate.exam_dir(o)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the hub cache is read (load_hub says what is missing)
    assert evaluate.exam_dir(o) is None


def test_right_after_the_demo_in_the_project_folder():
    """`make demo` leaves runs/demo: there the command picks its sft adapter (skipped without the demo)."""
    from devops_cli.runs import finished

    runs = [r for r in finished(ROOT / "runs") if "demo" in str(r.path)]
    if not runs:
        pytest.skip("no finished demo run under runs/ (make demo makes one)")
    assert runs[0].path.name == "sft" and runs[0].base
