"""The memory plan (memory.py) and the machine checks before launch (machine.py): parameter counts
against the real module, every shipped recipe's plan, refusals with numbers and fixes, force=true,
and the plan against measured peaks of real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, SHARED, run_cli, run_main
from devops_cli.train import memory, recipe


@pytest.mark.parametrize("arch, extra", [("Qwen2", {}), ("Llama", {"attention_bias": True}), ("Qwen3", {}),
                                         ("Mistral", {}), ("Qwen2", {"tie_word_embeddings": True})])  # fmt: skip
def test_parameter_count_equals_the_real_module(arch, extra):
    import torch
    import transformers

    kwargs = dict(vocab_size=1000, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=16, **extra)  # fmt: skip
    config = getattr(transformers, f"{arch}Config")(**kwargs)
    with torch.device("meta"):
        model = getattr(transformers, f"{arch}ForCausalLM")(config)
    real = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter
    assert memory.Shape.from_config(config.to_dict()).params == real


def test_qwen_v1_is_sized_as_its_qwen2_conversion():
    path = SHARED / "data" / "qwen-v1" / "config-qwen-7b-chat-2023-08.json"
    if not path.is_file():
        pytest.skip(f"Qwen v1 configs not found at {path.parent} (../shared)")
    shape = memory.Shape.from_config(json.loads(path.read_text()))
    assert 7.6e9 < shape.params < 7.8e9  # Qwen-7B: 7.72B with its untied head
    assert shape.kv_heads == shape.heads == 32 and shape.intermediate == 11008


SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in SHIPPED if "stage" in p.read_text()], ids=lambda p: p.name)
def test_every_shipped_recipe_has_a_memory_plan(path, tiny_model, capsys):
    overrides = [] if path.name[0].isdigit() else [f"model_name_or_path={tiny_model}"]
    r = recipe.load(path, overrides)
    plan, _ = memory.plan_recipe(r, r.nproc_per_node or 1, 1, [], json.loads(Path(r.deepspeed).read_text()) if r.deepspeed else None)
    assert plan is not None
    with capsys.disabled():
        print(f"\n{path.name}:\n{plan.table()}")
    if path.name[0].isdigit():  # GPU recipes (bf16): planned per GPU
        assert plan.device == "GPU" and plan.processes == r.nproc_per_node  # 8 per node as CodeFuse; QLoRA: 1
        assert 5 * memory.GiB < plan.need < 80 * memory.GiB, plan.table()


def _big_model(tmp_path: Path, layers: int = 8, hidden: int = 1024) -> Path:
    """A model folder with a config.json and a tokenizer's config only: the plan needs no weights."""
    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": hidden, "num_hidden_layers": layers,
                                              "num_attention_heads": 8, "num_key_value_heads": 4,
                                              "intermediate_size": 3 * hidden, "vocab_size": 4096}))  # fmt: skip
    (d / "tokenizer_config.json").write_text("{}")  # a model folder without a tokenizer is refused first
    return d


def test_a_run_that_cannot_fit_is_refused_with_numbers_and_fixes(tmp_path):
    model = _big_model(tmp_path)
    out = tmp_path / "out"
    args = ["pt", str(ROOT / "configs" / "tiny-pt.yaml"), f"model_name_or_path={model}", f"output_dir={out}",
            "max_source_length=32768", "per_device_train_batch_size=2", "val_size=0", "eval_steps=null"]  # fmt: skip
    r = recipe.load(args[1], args[2:])
    plan, extra = memory.plan_recipe(r, 1, 1, [], None)
    if plan.fits:
        pytest.skip(f"this machine has {memory.gib(plan.available)}, enough for {memory.gib(plan.need)}")
    res = run_main(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = next(line for line in res.stderr.splitlines() if "memory plan:" in line)
    assert f"this run needs about {memory.gib(plan.need)} per CPU worker, this machine has {memory.gib(plan.available)}" in line
    with_ckpt = memory.estimate(recipe.load(args[1], [*args[2:], "gradient_checkpointing=true"]), *extra)
    if with_ckpt.fits:
        assert "it fits with: gradient_checkpointing=true" in line
    assert "force=true launches anyway" in line
    assert not out.exists()  # refused before output_dir was made
    # --dry-run shows the plan and what would stop the launch, and exits 0
    dry = run_main(*args, "--dry-run")
    assert dry.returncode == 0 and "# memory plan per CPU worker" in dry.stdout
    assert "on this machine the launch would stop: memory plan:" in dry.stderr
    forced = run_main(*args, "--force", "--dry-run")
    assert forced.returncode == 0 and "memory plan:" not in forced.stderr and "force: true" in forced.stdout


def test_the_14b_recipe_on_this_machine_stops_before_any_worker(tmp_path):
    """Without a GPU: one line per problem (workers, precision, the model, the plan with numbers)."""
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("this test is about a machine without a GPU")
    out = tmp_path / "14b"
    r = run_main("sft", str(ROOT / "configs" / "14b-sft.yaml"), f"output_dir={out}", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert any("nproc_per_node 8 [recipe] on a node with no GPU" in e for e in errors)
    assert any("bf16 is on, but this machine has no GPU" in e and "bf16=false" in e for e in errors)
    assert any("model 'Qwen/Qwen2.5-14B' is neither a local directory nor in the hub cache" in e for e in errors)
    assert any("memory plan: this run needs about" in e and "per GPU, 8 GPU(s) per node" in e for e in errors)
    assert not out.exists()
    dry = run_main("sft", str(ROOT / "configs" / "14b-sft.yaml"), f"output_dir={out}", "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert dry.returncode == 0 and "# memory plan per GPU (8 per node), model 14.77B parameters" in dry.stdout
    assert "(this machine: no GPU)" in dry.stdout and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage, extra", [("pt", []), ("sft", ["finetuning_type=lora"])], ids=["full", "lora"])
def test_the_plan_is_within_a_factor_of_two_of_a_real_run(stage, extra, tmp_path):
    """Peak resident memory of a real 1-worker run of a 15M-parameter model on this CPU (metrics.json)."""
    from devops_cli.tiny import build

    model = build(tmp_path / "mid", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4)
    out = tmp_path / "run"
    r = run_cli(stage, str(ROOT / "configs" / f"tiny-{stage}.yaml"), f"model_name_or_path={model}", f"output_dir={out}",
                "max_steps=3", "save_steps=100000", "val_size=0", "eval_steps=null", "report_to=none",
                "plot_loss=false", *extra)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    measured = json.loads((out / "metrics.json").read_text())["peak_rss_bytes"]
    plan, _ = memory.plan_recipe(recipe.load(out / "recipe.yaml"), 1, 1, [], None)
    print(f"{stage} {extra}: plan {memory.gib(plan.need)}, measured {memory.gib(measured)}")
    assert 0.5 < plan.need / measured < 2.0
    assert "memory plan:" in r.stdout  # in the launch banner
    assert "# memory plan per CPU worker" in (out / "recipe.yaml").read_text()  # and in the record
