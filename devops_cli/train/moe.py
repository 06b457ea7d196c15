"""Mixture-of-experts models (Qwen3-MoE, Qwen3.5-MoE) and LoRA, from config.json alone (no torch).

transformers 5 stores each layer's experts fused, as 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`), and the router (`mlp.gate`) as a module of its own: none of them is an
nn.Linear. peft (0.21) adapts them through `target_parameters` (its ParamWrapper): `lora_target: all`
covers attention + router + experts (peft maps the Qwen2-MoE names gate_proj/up_proj/down_proj/gate onto
the fused parameters, gate_up_proj at rank 2r so that gate and up each get rank r). ParamWrapper
cannot apply dropout (lora_B(lora_A(dropout(x))) does not factor out of the fused product), so the
adapter's lora_dropout must be 0 whenever experts or router are targeted.
"""

from __future__ import annotations

from devops_cli.errors import DevopsError

# lora_target names that reach the fused experts or the router on a MoE model (peft's v4 -> v5 mapping)
EXPERT_TARGETS = ("gate", "gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def text_config(config: dict) -> dict:
    """The language model's config (vision-language checkpoints nest it under text_config)."""
    return config.get("text_config") or config


def experts(config: dict) -> int:
    c = text_config(config)
    return int(c.get("num_experts") or c.get("num_local_experts") or 0)


def targets_experts(lora_target: str) -> bool:
    names = {t.strip() for t in lora_target.split(",")}
    return lora_target == "all" or bool(names & set(EXPERT_TARGETS))


def lora_dropout_rule(r, config: dict | None) -> tuple[DevopsError | None, str | None]:
    """(the refusal, or the note of a default changed) for LoRA on a MoE model's experts and router:
    an explicit lora_dropout > 0 is refused; the default becomes 0 (recorded in recipe.yaml)."""
    if r.finetuning_type != "lora" or not config or not experts(config) or not targets_experts(r.lora_target):
        return None, None
    if r.lora_dropout == 0:
        return None, None
    if "lora_dropout" in r.origin:
        return DevopsError(f"lora_dropout {r.lora_dropout} on a mixture-of-experts model: peft's LoRA on its fused "
                           f"expert and router weights (lora_target {r.lora_target}) takes no dropout",
                           r.where("lora_dropout"),
                           f"set lora_dropout: 0, or adapt attention only: lora_target: {','.join(ATTENTION_TARGETS)}"), None
    r.lora_dropout = 0.0
    r.origin["lora_dropout"] = "0 on a mixture-of-experts model (fused experts take no dropout)"
    return None, ("lora_dropout is 0, not the default 0.1: peft's LoRA on the fused expert and router weights of "
                  "this mixture-of-experts model takes no dropout")


def describe_adapter(model) -> str | None:
    """One line for a LoRA model whose adapter reaches fused expert parameters: what it adapts (None for
    an adapter on linear layers only)."""
    kinds: dict[str, int] = {}
    for m in model.modules():
        if type(m).__name__ == "ParamWrapper":
            name = "router" if m.parameter_name == "weight" else f"experts.{m.parameter_name}"
            kinds[name] = kinds.get(name, 0) + 1
    if not kinds:
        return None
    parts = ", ".join(f"{name} in {n} layers" for name, n in sorted(kinds.items()))
    return f"LoRA on the mixture-of-experts weights too (peft target_parameters, every expert its own adapter): {parts}"
