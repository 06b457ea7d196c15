"""QLoRA (quantization_bit: 4 | 8 with LoRA, bitsandbytes): what cannot work is one line before
launch; 4-bit sft and dpo train, save an adapter, and export merges it onto the unquantized base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_dpo import TINY_DPO, _ok, _one_error

from conftest import ROOT, run_cli, run_main

TINY_SFT = str(ROOT / "configs" / "tiny-sft.yaml")
LORA = ["finetuning_type=lora", "learning_rate=5e-3", "val_size=0", "eval_steps=null"]


def test_quantization_bit_3_is_one_line(tiny_model, tmp_path):
    r = run_main("sft", TINY_SFT, f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'o'}", *LORA, "quantization_bit=3")
    _one_error(r, "quantization_bit must be 4 or 8, got 3")
    assert not (tmp_path / "o").exists()


def test_quantization_with_full_fine_tuning_is_one_line(tiny_model, tmp_path):
    r = run_main("sft", TINY_SFT, f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'o'}", "quantization_bit=4")
    _one_error(r, "needs finetuning_type: lora")


def test_8_bit_under_zero3_is_one_line(tiny_model, tmp_path):
    r = run_main("sft", TINY_SFT, f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'o'}", *LORA,
                "quantization_bit=8", f"deepspeed={ROOT}/configs/deepspeed/zero3.json")
    _one_error(r, "8-bit", "ZeRO-3")


def test_a_gptq_base_with_lora_target_all_names_the_modules(tiny_model, tmp_path):
    base = tmp_path / "gptq"
    shutil.copytree(tiny_model, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (base / "config.json").write_text(json.dumps(config))
    r = run_main("sft", TINY_SFT, f"model_name_or_path={base}", f"output_dir={tmp_path / 'o'}", *LORA)
    line = _one_error(r, "lora_target: all matches no layer of a GPTQ model")
    assert "q_proj,k_proj,v_proj,o_proj" in line
    r = run_main("sft", TINY_SFT, f"model_name_or_path={base}", f"output_dir={tmp_path / 'o'}", *LORA, "lora_target=all",
                "quantization_bit=4")
    assert "already quantized (gptq)" in r.stderr


def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


@pytest.mark.slow
def test_qlora_4bit_sft_trains_saves_and_export_merges(tiny_model, tmp_path):
    out = tmp_path / "qlora"
    r = _ok(run_cli("sft", TINY_SFT, f"model_name_or_path={tiny_model}", f"output_dir={out}", *LORA, "quantization_bit=4",
                    "max_steps=12", "logging_steps=4", "save_steps=100"))
    assert "QLoRA 4-bit nf4" in r.stdout + r.stderr
    losses = _losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["peak_rss_bytes"] > 0
    assert "bitsandbytes" in metrics["optional_libraries"] and "gptqmodel" not in metrics["optional_libraries"]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    merged = tmp_path / "merged"
    r = _ok(run_main("export", "--adapter", str(out), "--output", str(merged)))
    assert "4-bit (QLoRA) base" in r.stdout + r.stderr and "unquantized base weights" in r.stdout + r.stderr
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config  # full-precision weights, loadable anywhere
    r = _ok(run_main("chat", "--model", str(merged), "--temperature", "0", "--max-new-tokens", "8", "--prompt", "disk full?"))
    assert "prompt tokens" in r.stderr and "tokens/s" in r.stderr  # it loaded and generated (a tiny random model may say only spaces)


@pytest.mark.slow
def test_qlora_4bit_dpo_trains(tiny_model, tmp_path):
    out = tmp_path / "qdpo"
    _ok(run_cli("dpo", TINY_DPO, f"model_name_or_path={tiny_model}", f"output_dir={out}", "quantization_bit=4",
                "max_steps=10", "logging_steps=5"))
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    margins = [h["rewards/margins"] for h in log if "rewards/margins" in h]
    assert len(margins) == 2 and margins[-1] > 0, margins
    assert (out / "adapter_model.safetensors").is_file()
