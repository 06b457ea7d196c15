"""Recipes: every shipped one validates; every kind of bad recipe or dataset is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_main
from devops_cli.errors import DevopsError
from devops_cli.train import checks, recipe

# training recipes (eval.yaml and other commands' recipes are checked by those commands' tests)
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "stage" in yaml.safe_load(p.read_text()))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"7b-pt.yaml", "7b-sft.yaml", "14b-pt.yaml", "14b-sft.yaml", "14b-sft-lora.yaml",
            "tiny-pt.yaml", "tiny-sft.yaml", "tiny-dpo.yaml", "7b-dpo-lora.yaml"} <= names  # fmt: skip
    assert {p.name for p in (ROOT / "configs" / "deepspeed").glob("*.json")} >= {"zero2.json", "zero3.json", "zero3-offload.json"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_validates(path, tiny_model, tmp_path):
    first = path.read_text().splitlines()[0]
    stage = yaml.safe_load(path.read_text())["stage"]
    assert first.startswith(f"# devops-model {stage} configs/{path.name}"), "a recipe opens with its command"
    overrides = [f"output_dir={tmp_path / 'out'}"]
    if path.name.startswith("tiny"):  # the tiny recipes point at runs/ made by `make demo`
        overrides.append(f"model_name_or_path={tiny_model}")
    r = recipe.load(path, overrides)
    warnings, resume = checks.check(r), checks.resume_decision(r)
    assert resume is None
    assert all("hub" in w for w in warnings)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_config_is_valid(path):
    config = json.loads(path.read_text())
    assert checks.deepspeed_problems(config, str(path)) == []
    # the HF integration fills every "auto" value without complaint
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    class Args:  # the TrainingArguments fields trainer_config_process reads
        world_size, per_device_train_batch_size, gradient_accumulation_steps = 2, 4, 2
        max_grad_norm, learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay = 1.0, 1e-4, .9, .999, 1e-8, 0.0
        fp16, bf16, fp16_full_eval, bf16_full_eval, fp16_backend, fp16_opt_level = False, True, False, False, "auto", "O1"
        optim, save_on_each_node, torch_compile, eval_strategy = "adamw_torch", False, False, "no"
        lr_scheduler_type, warmup_steps = "cosine", 0.0

        def get_warmup_steps(self, n):
            return 0

    ds = HfTrainerDeepSpeedConfig(config)
    ds.trainer_config_process(Args(), auto_find_batch_size=False)
    ds.trainer_config_finalize(Args(), type("M", (), {"config": type("C", (), {"hidden_size": 128})()})(), 100)
    assert "auto" not in json.dumps(ds.config)
    assert ds.config["zero_optimization"]["stage"] in (2, 3)
    if ds.config["zero_optimization"]["stage"] == 3:
        assert ds.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_overrides_types_and_dump_round_trip(tmp_path):
    r = recipe.load(ROOT / "configs" / "14b-sft.yaml",
                    ["learning_rate=1e-5", "max_steps=7", "system_prompt=You are an SRE.", "weight_decay=0.1"])
    assert r.learning_rate == 1e-5 and isinstance(r.learning_rate, float)
    assert r.max_steps == 7 and r.system_prompt == "You are an SRE."
    assert r.extra == {"weight_decay": 0.1}
    assert r.where("learning_rate") == "override 'learning_rate=1e-5'"
    assert r.where("bf16").startswith(str(ROOT / "configs" / "14b-sft.yaml") + ":")
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.dump(r, "from a test"))
    again = recipe.load(path)
    assert again.to_dict() == r.to_dict()


def test_yaml_numbers_written_as_strings_are_numbers():
    r = recipe.build({"stage": "pt", "model_name_or_path": "m", "dataset": "d", "output_dir": "o",
                      "learning_rate": "5e-5", "warmup_ratio": "0.1"}, {}, "x.yaml")  # fmt: skip
    assert r.learning_rate == 5e-5 and r.warmup_ratio == 0.1


# ----------------------------------------------------------------------------------------------
# Bad recipes and datasets: one line each, exit code 2, no traceback
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (d / "tokenizer_config.json").write_text("{}")  # a model folder has a tokenizer (weights.check_tokenizer)
    return d


def _recipe(tmp_path: Path, data_dir: Path, model_dir: Path, **changes) -> Path:
    base = {"stage": "sft", "model_name_or_path": str(model_dir), "dataset": "qa", "dataset_dir": str(data_dir),
            "output_dir": str(tmp_path / "out"), "max_steps": 5}
    base.update(changes)
    base = {k: v for k, v in base.items() if v is not None}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def _edit_data(data_dir: Path, name: str, entry: dict | None = None, file: tuple[str, str] | None = None):
    if entry is not None:
        info = json.loads((data_dir / "dataset_info.json").read_text())
        info[name] = entry
        (data_dir / "dataset_info.json").write_text(json.dumps(info))
    if file is not None:
        (data_dir / file[0]).write_text(file[1])


BAD = {
    # id: (recipe changes, dataset edits, extra argv, expected text in the error line)
    "unknown-key": ({"learnig_rate": 1e-4}, None, [], "unknown key 'learnig_rate' — did you mean 'learning_rate'?"),
    "wrong-type": ({"learning_rate": "fast"}, None, [], "learning_rate expects a number, got 'fast'"),
    "bad-choice": ({"finetuning_type": "lroa"}, None, [], "finetuning_type: 'lroa' is not one of full, lora — did you mean 'lora'?"),
    "missing-required": ({"dataset": None}, None, [], "missing required key 'dataset'"),
    "stage-mismatch": ({"stage": "pt"}, None, [], "the recipe says stage: pt but you ran `devops-model sft`"),
    "bf16-and-fp16": ({"bf16": True, "fp16": True}, None, [], "bf16 and fp16 are both on"),
    "lora-key-with-full": ({"lora_rank": 16}, None, [], "lora_rank is set but finetuning_type is full"),
    "lora-target-unknown": ({"finetuning_type": "lora", "lora_target": "q_proj,query_key_value"}, None, [],
                            "lora_target 'query_key_value' is not a linear layer of a qwen2 model"),
    "negative-batch": ({"per_device_train_batch_size": 0}, None, [], "per_device_train_batch_size must be >= 1"),
    "val-size": ({"val_size": 1.5}, None, [], "val_size must be a ratio in (0, 1) or a whole count"),
    "eval-without-val": ({"eval_steps": 10}, None, [], "eval_steps is set but val_size is 0"),
    "nothing-to-train": ({"max_steps": -1, "num_train_epochs": 0}, None, [], "nothing to train"),
    "max-steps-negative": ({"max_steps": -5}, None, [], "max_steps must be >= 1, or -1 to train num_train_epochs, got -5"),
    "model-missing": ({"model_name_or_path": "./no/such/model"}, None, [], "model directory 'no/such/model' does not exist"),
    "model-without-config": ({"model_name_or_path": "."}, None, [], "has no config.json"),
    "dataset-undefined": ({"dataset": "qaa"}, None, [], "dataset 'qaa' is not defined in"),
    "dataset-other-stage": ({"dataset": "corpus"}, None, [], "dataset is for stage pt, the recipe trains stage sft"),
    "dataset-file-missing": ({}, ("qa", {"file_name": "nope.jsonl"}), [], "data file"),
    "dataset-column-missing": ({}, ("qa", {"file_name": "qa.jsonl", "columns": {"response": "answer"}}), [],
                               "column 'answer' (response) missing in dataset 'qa'"),
    "dataset-empty-file": ({"dataset": "empty"}, ("empty", {"file_name": "empty.jsonl"}, ("empty.jsonl", "")), [], "is empty"),
    "dataset-bad-jsonl": ({"dataset": "broken"}, ("broken", {"file_name": "broken.jsonl"}, ("broken.jsonl", '{"instruction": "x",\n')),
                          [], "invalid JSON line"),
    "dataset-info-bad-json": ({}, (None, None, ("dataset_info.json", '{"qa": {"file_name": "qa.jsonl",}}')), [], "invalid JSON"),
    "dataset-dir-missing": ({"dataset_dir": "/no/such/dir"}, None, [], "dataset_dir '/no/such/dir' is not a directory"),
    "deepspeed-missing": ({"deepspeed": "no-such-ds.json"}, None, [], "DeepSpeed config 'no-such-ds.json' not found"),
    "deepspeed-bf16-conflict": ({"deepspeed": "DS_BF16"}, None, [], "bf16.enabled is true in the DeepSpeed config but bf16 is false"),
    "deepspeed-stage": ({"deepspeed": "DS_STAGE5"}, None, [], "zero_optimization.stage must be 0-3"),
    "passthrough-type": ({"weight_decay": "heavy"}, None, [], "weight_decay expects a number"),
    "passthrough-renamed": ({"evaluation_strategy": "steps"}, None, [], "unknown key 'evaluation_strategy' — did you mean 'eval_strategy'?"),
    "node-rank": ({"nnodes": 2, "node_rank": 2}, None, [], "node_rank 2 must be below nnodes 2"),
    "override-syntax": ({}, None, ["learning_rate"], "override 'learning_rate' is not key=value"),
    "resume-not-checkpoint": ({"resume_from_checkpoint": "/tmp"}, None, [], "is not a complete checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2(case, tmp_path, data_dir, model_dir):
    changes, data_edit, argv, expected = BAD[case]
    changes = dict(changes)
    if changes.get("deepspeed") == "DS_BF16":
        (tmp_path / "ds.json").write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
        changes["deepspeed"] = str(tmp_path / "ds.json")
    if changes.get("deepspeed") == "DS_STAGE5":
        (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 5}}))
        changes["deepspeed"] = str(tmp_path / "ds.json")
    if data_edit:
        name, entry, *file = data_edit
        _edit_data(data_dir, name, entry, file[0] if file else None)
    path = _recipe(tmp_path, data_dir, model_dir, **changes)
    r = run_main("sft", str(path), *argv, "--dry-run", cwd=tmp_path)
    assert r.returncode == 2, r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


def test_yaml_syntax_and_duplicate_keys_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\nmodel_name_or_path: m\n  dataset: [x\n")
    r = run_main("sft", str(bad), "--dry-run")
    assert r.returncode == 2 and f"{bad}:3" in r.stderr and "Traceback" not in r.stderr
    dup = tmp_path / "dup.yaml"
    dup.write_text("stage: sft\nlearning_rate: 1e-4\nseed: 1\nlearning_rate: 2e-4\n")
    r = run_main("sft", str(dup), "--dry-run")
    assert r.returncode == 2 and f"{dup}:4: key 'learning_rate' appears twice (also line 2)" in r.stderr


def test_missing_recipe_file():
    r = run_main("sft", "configs/no-such.yaml", "--dry-run")
    assert r.returncode == 2 and r.stderr.strip() == "error: recipe file not found: configs/no-such.yaml — check the path (configs/ holds examples)"


def test_all_problems_are_reported_at_once(tmp_path, data_dir, model_dir):
    path = _recipe(tmp_path, data_dir, model_dir, learnig_rate=1, bf16="maybe", seed="x")
    r = run_main("sft", str(path), "--dry-run")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 3


def test_output_dir_of_another_run_is_refused_and_a_rerun_resumes(tmp_path, data_dir, model_dir):
    out = tmp_path / "out"
    r = recipe.load(_recipe(tmp_path, data_dir, model_dir))
    out.mkdir()
    (out / "recipe.yaml").write_text(recipe.dump(r))
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-5").mkdir()  # incomplete: no trainer_state.json
    # same recipe (launch keys and max_steps may change): resume from the last complete checkpoint
    same = recipe.load(_recipe(tmp_path, data_dir, model_dir, max_steps=50, nproc_per_node=2))
    assert checks.resume_decision(same) == out / "checkpoint-3"
    other = recipe.load(_recipe(tmp_path, data_dir, model_dir, learning_rate=1e-3))
    with pytest.raises(DevopsError, match="holds another run .*learning_rate"):
        checks.resume_decision(other)
    fresh = recipe.load(_recipe(tmp_path, data_dir, model_dir, learning_rate=1e-3, overwrite_output_dir=True))
    assert checks.resume_decision(fresh) is None
    (out / "recipe.yaml").unlink()
    with pytest.raises(DevopsError, match="not made by devops-model"):
        checks.resume_decision(same)


def test_another_node_starting_the_same_run_is_not_a_foreign_folder(tmp_path, data_dir, model_dir):
    """Multi-node on shared storage: node 1 may have made output_dir, its rank log and recipe.yaml's
    temporary file when node 0 looks; that is no user's folder. A file of the user's beside them is."""
    r = recipe.load(_recipe(tmp_path, data_dir, model_dir))
    out = Path(r.output_dir)
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "rank1.log").write_text("node 1 starting\n")
    (out / ".recipe.yaml.tmp-4242").write_text("stage: pt\n")
    (out / ".devops-model.lock").write_text("")
    assert checks.resume_decision(r) is None
    (out / "logs" / "notes.txt").write_text("mine")
    with pytest.raises(DevopsError, match="not made by devops-model"):
        checks.resume_decision(r)


def test_dataset_sha1_mismatch_warns(tmp_path, data_dir, model_dir):
    _edit_data(data_dir, "qa", {"file_name": "qa.jsonl", "file_sha1": "0" * 40})
    warnings = checks.check(recipe.load(_recipe(tmp_path, data_dir, model_dir)))
    assert any("file_sha1" in w for w in warnings)


def test_error_line_format():
    e = DevopsError("bad thing", "f.yaml:3", "do this")
    assert e.line() == "f.yaml:3: bad thing — do this"
