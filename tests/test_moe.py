"""Mixture-of-experts (Qwen3-MoE) and hybrid linear attention (Qwen3.5) in training: the shape behind
the memory plan equals the real modules (total and active parameters, LoRA adapter size), LoRA's
dropout rule on fused experts is checked before launch, and (slow) a LoRA run adapts the experts and
its adapter merges."""

from __future__ import annotations

import json

import pytest

from conftest import run_main
from devops_cli.train import memory, recipe
from devops_cli.train.shape import KNOWN, Shape


def _real(config, model_class) -> int:
    import torch

    with torch.device("meta"):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_equal_the_real_moe_and_linear_attention_modules():
    import transformers

    small = dict(vocab_size=1000, hidden_size=96, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                 head_dim=16)
    hybrid = dict(layer_types=["linear_attention"] * 3 + ["full_attention"], linear_num_key_heads=2,
                  linear_key_head_dim=16, linear_num_value_heads=4, linear_value_head_dim=24, linear_conv_kernel_dim=4)
    cases = [  # a dense layer among sparse ones (decoder_sparse_step, mlp_only_layers); Gated DeltaNet; both + shared expert
        (transformers.Qwen3MoeConfig(intermediate_size=200, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                     decoder_sparse_step=2, mlp_only_layers=[3], **small), transformers.Qwen3MoeForCausalLM),
        (transformers.Qwen3_5TextConfig(intermediate_size=200, **hybrid, **small), transformers.Qwen3_5ForCausalLM),
        (transformers.Qwen3_5MoeTextConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                           shared_expert_intermediate_size=64, **hybrid, **small),
         transformers.Qwen3_5MoeForCausalLM),
    ]  # fmt: skip
    for config, model_class in cases:
        shape = Shape.from_config(config.to_dict())
        assert shape.params == _real(config, model_class), model_class.__name__
    # nested under text_config, as vision-language checkpoints (Qwen3.5) keep it
    text = cases[1][0].to_dict()
    assert Shape.from_config({"model_type": "qwen3_5", "text_config": text}).params == Shape.from_config(text).params


def test_qwen3_30b_a3b_total_and_active_parameters_in_the_plan():
    shape = Shape.from_config(KNOWN["Qwen/Qwen3-30B-A3B"])
    assert round(shape.params / 1e9, 2) == 30.53 and round(shape.active_params / 1e9, 2) == 3.35  # Qwen: 30.5B, 3.3B
    r = recipe.load(None, ["model_name_or_path=Qwen/Qwen3-30B-A3B", "dataset=devops_qa", "output_dir=o", "bf16=true",
                           "finetuning_type=lora", "lora_dropout=0"], stage="sft")
    plan, _ = memory.plan_recipe(r, 1, 1, [], None)
    assert "model 30.53B parameters (3.35B active per token: 8 of 128 experts)" in plan.table()
    assert plan.to_dict()["active_parameters"] == shape.active_params
    assert Shape.from_config(KNOWN["Qwen/Qwen3-8B"]).active_params == Shape.from_config(KNOWN["Qwen/Qwen3-8B"]).params


@pytest.mark.parametrize("arch", ["qwen3-moe", "qwen3.5"])
def test_lora_size_equals_peft_on_the_tiny_models(arch, tiny_arch):
    import torch
    from transformers import AutoModelForCausalLM

    from devops_cli.modeling import add_lora
    from devops_cli.train.moe import describe_adapter

    path = tiny_arch(arch)
    shape = Shape.from_config(json.loads((path / "config.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert shape.params == sum(p.numel() for p in model.parameters())
    model = add_lora(model, 8, 16, 0.0, "all", False)
    assert shape.lora_params(8) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    line = describe_adapter(model)
    if arch == "qwen3-moe":  # experts and router adapted, each expert its own adapter
        assert "experts.gate_up_proj in 2 layers" in line and "experts.down_proj" in line and "router in 2 layers" in line
    else:
        assert line is None


def test_lora_dropout_on_fused_experts_refused_or_defaulted_to_0(tiny_arch, tmp_path, capsys):
    from devops_cli.cli import main

    def sft(*overrides):
        with pytest.raises(SystemExit) as e:
            main(["sft", f"model_name_or_path={tiny_arch('qwen3-moe')}", "dataset=devops_qa", "finetuning_type=lora",
                  f"output_dir={tmp_path / 'o'}", *overrides, "--dry-run", "--json"])
        out, err = capsys.readouterr()
        return e.value.code, out, err

    code, out, err = sft("lora_dropout=0.05")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "lora_dropout 0.05 on a mixture-of-experts model" in err and "set lora_dropout: 0" in err
    code, out, err = sft()  # the default (0.1) becomes 0, recorded and said
    assert code == 0 and json.loads(out)["recipe"]["lora_dropout"] == 0.0
    assert "lora_dropout is 0, not the default 0.1" in err
    code, out, _ = sft("lora_dropout=0.05", "lora_target=q_proj,k_proj,v_proj,o_proj")  # attention only: dropout is fine
    assert code == 0 and json.loads(out)["recipe"]["lora_dropout"] == 0.05


@pytest.mark.slow
def test_moe_lora_sft_trains_every_expert_adapter_and_the_merge_keeps_it(tiny_arch, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tiny_arch("qwen3-moe")
    out = tmp_path / "lora"
    run = run_main("sft", "configs/tiny-sft.yaml", f"model_name_or_path={base}", f"output_dir={out}", "template=auto",
                  "finetuning_type=lora", "learning_rate=5e-3", "max_steps=3", "max_samples=8", "val_size=0",
                  "eval_steps=null", "save_steps=100", "plot_loss=false")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "LoRA on the mixture-of-experts weights too" in run.stdout and "lora_dropout is 0" in run.stderr
    adapter = load_file(out / "adapter_model.safetensors")
    experts = {k: v for k, v in adapter.items() if ".mlp.experts." in k or ".mlp.gate." in k}
    assert {k.split("layers.0.")[1] for k in experts if "layers.0." in k} == {
        "mlp.experts.base_layer.lora_A.weight", "mlp.experts.base_layer.lora_B.weight",  # gate_up_proj, every expert
        "mlp.experts.lora_A.weight", "mlp.experts.lora_B.weight", "mlp.gate.lora_A.weight", "mlp.gate.lora_B.weight"}
    assert adapter["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape[0] == 4 * 16  # 4 experts, 2r
    # lora_B starts at zero (peft's init): every expert adapter moved in training
    for key, value in experts.items():
        if "lora_B" in key:
            assert value.abs().max() > 0, key
    merged = tmp_path / "merged"
    run = run_main("export", "--adapter", str(out), "--output", str(merged))
    assert run.returncode == 0, run.stderr[-2000:]
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        before = plain(ids).logits
        adapted = PeftModel.from_pretrained(plain, str(out)).eval()(ids).logits
        after = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits
    assert (after - adapted).abs().max() < 1e-4 < (after - before).abs().max()
    base_w, merged_w = load_file(base / "model.safetensors"), load_file(merged / "model.safetensors")
    changed = [k for k in base_w if "experts" in k and not torch.equal(base_w[k], merged_w[k])]
    assert len(changed) == len([k for k in base_w if "experts" in k]) > 0  # every expert weight merged
