"""Real runs on the tiny Qwen3-family models (slow: each launches training) — Qwen3 (dense), Qwen3-MoE
and Qwen3.5 (hybrid linear attention), each in Qwen3's thinking template: sft full and LoRA on the
bundled multi-turn data (every assistant turn its own example), the LoRA adapter merged by export
with the template kept, dpo LoRA, pt. Qwen3.5's sft batches are padded, said in one line. The MoE
adapter's expert weights and their merge: tests/test_moe.py."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_main

ARCHES = ["qwen3", "qwen3-moe", "qwen3.5"]
SHORT = ["max_steps=2", "max_samples=8", "val_size=0", "eval_steps=null", "save_steps=100", "logging_steps=1",
         "plot_loss=false", "report_to=none"]
PADDED = ("sft batches: padded to the longest example, not padding-free: its linear-attention layers would carry "
          "their state from one packed example into the next")


def _metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _template(folder) -> str:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    return json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("arch", ARCHES)
def test_sft_multi_turn(arch, kind, tiny_arch, tmp_path):
    out = tmp_path / kind
    extra = ["finetuning_type=lora", "learning_rate=5e-3"] if kind == "lora" else []
    run = run_main("sft", "configs/tiny-sft.yaml", f"model_name_or_path={tiny_arch(arch)}", f"output_dir={out}",
                  "dataset=devops_chat,devops_qa", *SHORT, *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    m = _metrics(out)
    # the multi-turn conversations: one example per assistant turn, every turn trained
    assert m["data"]["conversations"] == 16 and m["data"]["examples"] > 16, m["data"]
    assert f"sft data: 16 conversations -> {m['data']['examples']} examples kept" in run.stdout
    assert m["global_step"] == 2 and math.isfinite(m["train_loss"])
    said = [x for x in (run.stdout + run.stderr).splitlines() if "sft batches" in x or "padding-free" in x]
    if arch == "qwen3.5":
        assert said == [PADDED] and m["packing"] is False, said
    else:
        assert said == ["sft batches: padding-free (examples packed, attention kept within each)"], said
    assert "enable_thinking" in _template(out)  # the saved model keeps the template it was trained in
    if kind == "lora" and arch != "qwen3-moe":  # (MoE: test_moe.py)
        merged = tmp_path / "merged"
        run = run_main("export", "--adapter", str(out), "--output", str(merged))
        assert run.returncode == 0, run.stderr[-2000:]
        assert (merged / "model.safetensors").is_file() and "enable_thinking" in _template(merged)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_dpo_lora(arch, tiny_arch, tmp_path):
    out = tmp_path / "dpo"
    run = run_main("dpo", "configs/tiny-dpo.yaml", f"model_name_or_path={tiny_arch(arch)}", f"output_dir={out}", *SHORT)
    assert run.returncode == 0, run.stderr[-3000:]
    m = _metrics(out)
    assert m["global_step"] == 2 and "rewards/margins" in m and (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_pt(arch, tiny_arch, tmp_path):
    out = tmp_path / "pt"
    run = run_main("pt", "configs/tiny-pt.yaml", f"model_name_or_path={tiny_arch(arch)}", f"output_dir={out}",
                  "max_source_length=128", *SHORT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _metrics(out)["global_step"] == 2 and math.isfinite(_metrics(out)["train_loss"])
