"""`devops-model dpo`: preference data checked before launch, the data path against sft's rendering,
and real training runs (TRL's trainers in torchrun workers, LoRA, ZeRO-3, KTO, ORPO, SimPO)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, run_main, write_jsonl

TINY_DPO = str(ROOT / "configs" / "tiny-dpo.yaml")
PAIRS = [{"instruction": f"How do I fix problem {i}?", "input": "", "chosen": f"Read the logs of service {i}, then roll back.",
          "rejected": "Reboot everything."} for i in range(12)]  # fmt: skip


def _ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _one_error(r, *words):
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def _pref_dir(tmp_path: Path, records=PAIRS, entry=None) -> Path:
    d = tmp_path / "pref"
    d.mkdir(exist_ok=True)
    write_jsonl(d / "pairs.jsonl", records)
    write_jsonl(d / "qa.jsonl", [{"instruction": "q", "output": "a"}] * 4)
    (d / "dataset_info.json").write_text(json.dumps({
        "pairs": entry or {"file_name": "pairs.jsonl", "ranking": True},
        "qa": {"file_name": "qa.jsonl"},
    }))  # fmt: skip
    return d


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2, before any worker starts (no output_dir is made)
# ----------------------------------------------------------------------------------------------
def test_a_ranking_dataset_for_sft_is_one_line(tiny_model, tmp_path):
    d = _pref_dir(tmp_path)
    r = run_main("sft", f"model_name_or_path={tiny_model}", "dataset=pairs", f"dataset_dir={d}", f"output_dir={tmp_path / 'o'}")
    _one_error(r, "ranking", "devops-model dpo")
    assert not (tmp_path / "o").exists()


def test_dpo_on_an_sft_dataset_is_one_line(tiny_model, tmp_path):
    d = _pref_dir(tmp_path)
    r = run_main("dpo", TINY_DPO, f"model_name_or_path={tiny_model}", "dataset=qa", f"dataset_dir={d}", f"output_dir={tmp_path / 'o'}")
    _one_error(r, "not a ranking dataset", '"ranking": true')


def test_chosen_equal_to_rejected_everywhere_is_one_line(tiny_model, tmp_path):
    d = _pref_dir(tmp_path, [{**p, "rejected": p["chosen"]} for p in PAIRS])
    r = run_main("dpo", TINY_DPO, f"model_name_or_path={tiny_model}", "dataset=pairs", f"dataset_dir={d}", f"output_dir={tmp_path / 'o'}")
    _one_error(r, "pairs.jsonl", "chosen equals rejected in every record (12)")
    assert not (tmp_path / "o").exists()


def test_a_bad_record_names_its_line(tiny_model, tmp_path):
    d = _pref_dir(tmp_path, PAIRS[:3] + [{"instruction": "q", "chosen": ["not", "a string"], "rejected": "r"}])
    r = run_main("dpo", TINY_DPO, f"model_name_or_path={tiny_model}", "dataset=pairs", f"dataset_dir={d}", f"output_dir={tmp_path / 'o'}")
    _one_error(r, "pairs.jsonl:4", "'chosen' (chosen) must be a string")


def test_kto_loss_on_pairs_and_pref_keys_outside_dpo_are_refused(tiny_model, tmp_path):
    r = run_main("dpo", TINY_DPO, f"model_name_or_path={tiny_model}", "pref_loss=kto", f"output_dir={tmp_path / 'o'}")
    _one_error(r, "chosen/rejected pairs", "pref_loss is kto")
    r = run_main("sft", str(ROOT / "configs" / "tiny-sft.yaml"), f"model_name_or_path={tiny_model}", "pref_beta=0.2",
                f"output_dir={tmp_path / 'o'}")
    _one_error(r, "pref_beta is set but stage is sft")
    r = run_main("dpo", TINY_DPO, f"model_name_or_path={tiny_model}", "pref_loss=dpo", f"output_dir={tmp_path / 'o'}")
    _one_error(r, "pref_loss", "sigmoid")


# ----------------------------------------------------------------------------------------------
# the data path: the prompt is what sft renders, the answers end with the end-of-turn token
# ----------------------------------------------------------------------------------------------
def test_pairs_are_tokenized_as_sft_renders_them(tokenizer):
    import datasets

    from devops_cli.train import data
    from devops_cli.train.recipe import load

    r = load(None, ["model_name_or_path=x", "dataset=devops_pref", "output_dir=o"], stage="dpo")
    raw = data.load_all(r, None)
    out, report = data.build_preferences(raw, tokenizer, r)
    assert report.examples == len(raw) == 32 and report.dropped_examples == 0
    first = raw[0]
    sft = datasets.Dataset.from_list([{"messages": first["messages"] + [{"role": "assistant", "content": first["chosen"]}]}])
    ids, labels = (lambda row: (row["input_ids"], row["labels"]))(data.build_sft(sft, tokenizer, r)[0][0])
    row = out[0]
    assert row["prompt_ids"] + row["chosen_ids"] == ids  # the same tokens sft trains on
    assert [t for t in labels if t != data.IGNORE] == row["chosen_ids"]  # scored exactly where sft trains
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert row["chosen_ids"][-1] == im_end and row["rejected_ids"][-1] == im_end
    assert tokenizer.decode(row["rejected_ids"], skip_special_tokens=True) == first["rejected"]


def test_sharegpt_pairs_and_kto_records_are_read(tokenizer, tmp_path):
    from devops_cli.train import data
    from devops_cli.train.recipe import load

    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "sg.jsonl", [{"messages": [{"role": "user", "content": "disk full?"}, {"role": "assistant", "content": "df -h"},
                                               {"role": "user", "content": "then?"}],
                                  "chosen": {"role": "assistant", "content": "du -xh /var"},
                                  "rejected": {"role": "assistant", "content": "reboot"}}] * 3)  # fmt: skip
    (d / "dataset_info.json").write_text(json.dumps({"sg": {"file_name": "sg.jsonl", "ranking": True, "formatting": "sharegpt",
                                                            "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"}}}))
    r = load(None, ["model_name_or_path=x", "dataset=sg", f"dataset_dir={d}", "output_dir=o"], stage="dpo")
    out, report = data.build_preferences(data.load_all(r, None), tokenizer, r)
    assert report.examples == 3
    prompt = tokenizer.decode(out[0]["prompt_ids"])
    assert "disk full?" in prompt and "df -h" in prompt and prompt.endswith("<|im_start|>assistant\n")  # history as context
    r = load(None, ["model_name_or_path=x", "dataset=devops_kto", "pref_loss=kto", "output_dir=o"], stage="dpo")
    out, report = data.build_preferences(data.load_all(r, None), tokenizer, r)
    assert report.examples == 64 and sorted(set(out["label"])) == [False, True]
    assert set(out.column_names) == {"prompt_ids", "completion_ids", "label"}


# ----------------------------------------------------------------------------------------------
# real runs
# ----------------------------------------------------------------------------------------------
def _log(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


@pytest.mark.slow
def test_dpo_lora_margin_grows_over_30_steps_and_exports(tiny_model, tmp_path):
    out = tmp_path / "dpo"
    # a fresh process: which optional libraries the run loaded is a property of its process
    r = _ok(run_cli("dpo", TINY_DPO, f"model_name_or_path={tiny_model}", f"output_dir={out}"))
    assert "done" in r.stdout
    logged = [h for h in _log(out) if "rewards/margins" in h]
    assert len(logged) == 6  # every 5 of 30 steps
    first, last = logged[0]["rewards/margins"], logged[-1]["rewards/margins"]
    assert last > first + 0.2 and logged[-1]["rewards/accuracies"] >= 0.75, logged
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "peak_rss_bytes"):
        assert key in metrics, key
    assert "trl" in metrics["optional_libraries"] and "bitsandbytes" not in metrics["optional_libraries"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    merged = tmp_path / "merged"
    _ok(run_main("export", "--adapter", str(out), "--output", str(merged)))
    r = _ok(run_main("chat", "--model", str(merged), "--temperature", "0", "--max-new-tokens", "8", "--prompt", "how do I roll back?"))
    assert "prompt tokens" in r.stderr and "tokens/s" in r.stderr  # it loaded and generated (a tiny random model may say only spaces)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["torchrun2", "zero3-lora", "zero3-full"])
def test_dpo_under_torchrun_and_zero3(variant, tiny_model, tmp_path):
    out = tmp_path / variant
    extra = {"torchrun2": ["nproc_per_node=2", "learning_rate=2e-3"],  # 5e-3 spikes within 8 steps at 2 x 4 pairs
             "zero3-lora": ["nproc_per_node=2", f"deepspeed={ROOT}/configs/deepspeed/zero3.json", "learning_rate=2e-3"],
             "zero3-full": ["nproc_per_node=2", f"deepspeed={ROOT}/configs/deepspeed/zero3.json", "finetuning_type=full",
                            "learning_rate=1e-3"]}[variant]  # fmt: skip
    _ok(run_cli("dpo", TINY_DPO, f"model_name_or_path={tiny_model}", f"output_dir={out}", "max_steps=8", "logging_steps=2", *extra))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 8
    logged = [h for h in _log(out) if "rewards/margins" in h]
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"], logged
    if variant == "zero3-full":  # ZeRO-3 gathered the whole policy; the frozen reference stayed a reference
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out)
        assert logged[-1]["rewards/chosen"] != 0.0


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kto", "orpo", "simpo", "ipo"])
def test_other_preference_losses_train_in_one_process(loss, tiny_model, tmp_path):
    out = tmp_path / loss
    extra = ["dataset=devops_kto"] if loss == "kto" else []
    _ok(run_main("dpo", TINY_DPO, f"model_name_or_path={tiny_model}", f"output_dir={out}", f"pref_loss={loss}",
                "max_steps=20", *extra))
    losses = [h["loss"] for h in _log(out) if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0], losses  # logged every 5 steps, falling
    assert (out / "adapter_model.safetensors").is_file()
    logged = _log(out)[-2]
    assert any(k.endswith("rewards/margins") or k.startswith("rewards/") for k in logged), logged
