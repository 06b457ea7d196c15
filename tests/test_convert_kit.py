"""Tiny synthetic Qwen v1 checkpoints shaped after the real configs in ../shared/data/qwen-v1, and a
reference Qwen v1 forward pass written from the published architecture (QWenLMHeadModel, 2023):
fused c_attn with bias, rotary (rotate-half layout), optional logn attention and stepwise dynamic NTK
past seq_length, RMSNorm, SwiGLU with w2 through SiLU, untied lm_head. Shared by tests/test_convert*.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

SHARED_V1 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "qwen-v1"
CONFIGS = {"2023-08": "config-qwen-7b-chat-2023-08.json", "2023-12": "config-qwen-7b-2023-12.json",
           "72b": "config-qwen-72b.json"}
# A model file that must never run: it leaves a mark if anything imports it.
REMOTE_CODE = "import pathlib\npathlib.Path(__file__).with_name('REMOTE_CODE_RAN').write_text('ran')\n"


def need_shared(*names: str) -> Path:
    missing = [n for n in names if not (SHARED_V1 / n).is_file()]
    if missing:
        pytest.skip(f"needs the real Qwen v1 files in {SHARED_V1} ({', '.join(missing)} absent)")
    return SHARED_V1


def v1_config(kind: str, hidden: int = 32, heads: int = 4, layers: int = 2, ffn: int = 96,
              seq_length: int | None = None) -> dict:
    """The real config of `kind`, scaled down in its own key schema (vocab and rope base kept)."""
    cfg = json.loads((need_shared(CONFIGS[kind]) / CONFIGS[kind]).read_text())
    if "n_embd" in cfg:  # Aug-2023 schema
        cfg.update(n_embd=hidden, n_head=heads, n_layer=layers, ffn_hidden_size=ffn)
    else:
        cfg.update(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=ffn)
    cfg["kv_channels"] = hidden // heads
    if seq_length is not None:
        cfg["seq_length"] = seq_length
    return cfg


def dims(cfg: dict) -> dict:
    g = lambda *ks: next(cfg[k] for k in ks if cfg.get(k) is not None)  # noqa: E731
    return {"h": g("hidden_size", "n_embd"), "heads": g("num_attention_heads", "n_head"),
            "layers": g("num_hidden_layers", "n_layer"), "ffn": g("intermediate_size", "ffn_hidden_size") // 2,
            "vocab": g("padded_vocab_size", "vocab_size"), "d": cfg["kv_channels"], "seq": cfg["seq_length"],
            "base": g("rotary_emb_base", "rope_theta"), "eps": cfg["layer_norm_epsilon"],
            "logn": bool(cfg.get("use_logn_attn")), "ntk": bool(cfg.get("use_dynamic_ntk"))}


def v1_weights(cfg: dict, seed: int = 0, dtype=None) -> dict:
    """Random weights under Qwen v1's names, scaled so every part moves the logits."""
    import torch

    m = dims(cfg)
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.1: (torch.randn(*shape, generator=g) * s)  # noqa: E731
    h, proj, ffn = m["h"], m["heads"] * m["d"], m["ffn"]
    sd = {"transformer.wte.weight": r(m["vocab"], h, s=0.5)}
    for i in range(m["layers"]):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(h), p + "attn.c_attn.weight": r(3 * proj, h, s=0.3),
                   p + "attn.c_attn.bias": r(3 * proj, s=0.3), p + "attn.c_proj.weight": r(h, proj),
                   p + "ln_2.weight": 1 + r(h), p + "mlp.w1.weight": r(ffn, h, s=0.2), p + "mlp.w2.weight": r(ffn, h, s=0.2),
                   p + "mlp.c_proj.weight": r(h, ffn, s=0.2)})
    sd["transformer.ln_f.weight"] = 1 + r(h)
    sd["lm_head.weight"] = r(m["vocab"], h)
    return {k: v.to(dtype) if dtype is not None else v for k, v in sd.items()}


def write_v1(out: Path, cfg: dict, sd: dict, fmt: str = "safetensors", shards: int = 1) -> Path:
    """A Qwen v1 checkpoint directory as the hub ships it (config, vocabulary, remote code, weights)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = SHARED_V1 / "generation_config-qwen-7b-chat-2023-08.json"
    if gen.is_file():
        (out / "generation_config.json").write_text(gen.read_text())
    os.symlink(need_shared("qwen.tiktoken") / "qwen.tiktoken", out / "qwen.tiktoken")
    for name in ("modeling_qwen.py", "configuration_qwen.py", "tokenization_qwen.py"):
        (out / name).write_text(REMOTE_CODE)
    names = list(sd)
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    base, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"{base}.{ext}" if shards == 1 else f"{base}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k].contiguous() for k in group}
        save_file(part, out / file) if fmt == "safetensors" else torch.save(part, out / file)
        weight_map.update(dict.fromkeys(group, file))
    if shards > 1:
        (out / f"{base}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def reference_logits(sd: dict, cfg: dict, ids: list[int]):
    """Qwen v1 forward pass for one sequence -> logits [T, vocab] (float64 but for the float32 rotary
    tables, as in v1's code; no cache; inference mode, where logn and dynamic NTK apply)."""
    return reference_hidden(sd, cfg, ids) @ sd["lm_head.weight"].double().T


def max_logit_diff(model, sd: dict, cfg: dict, ids: list[int], chunk: int = 256) -> float:
    """max |converted logits - reference logits| over every position and vocabulary entry, computed a
    chunk of positions at a time (full logits of 2048 x 151936 would need gigabytes)."""
    import torch

    hidden = reference_hidden(sd, cfg, ids)
    head = sd["lm_head.weight"].double()
    worst = 0.0
    for start in range(0, len(ids), chunk):
        keep = torch.arange(start, min(start + chunk, len(ids)))
        with torch.no_grad():
            got = model(torch.tensor([ids]), logits_to_keep=keep).logits[0].double()
        worst = max(worst, (got - hidden[keep] @ head.T).abs().max().item())
    return worst


def reference_hidden(sd: dict, cfg: dict, ids: list[int]):
    import torch

    m = dims(cfg)
    w = {k: v.double() for k, v in sd.items()}
    T, d, heads, seq = len(ids), m["d"], m["heads"], m["seq"]
    proj = heads * d

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m["eps"]) * weight

    alpha = 1
    if m["ntk"] and T > seq:  # QWenModel.get_ntk_alpha: stepwise, from the whole sequence length
        alpha = max(2 ** math.ceil(math.log(T / seq, 2) + 1) - 1, 1)
    base = m["base"] * alpha ** (d / (d - 2))
    # RotaryEmbedding works in float32 (inv_freq, outer product, cos/sin), as v1's code does
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().double()[:, None, :], emb.sin().double()[:, None, :]

    def rotary(t):  # [T, heads, d]
        t1, t2 = t[..., : d // 2], t[..., d // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    logn = torch.tensor([math.log(i, seq) if i > seq else 1.0 for i in range(1, T + 1)], dtype=torch.float64)
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    x = w["transformer.wte.weight"][torch.tensor(ids)]
    for i in range(m["layers"]):
        p = f"transformer.h.{i}."
        a = rms(x, w[p + "ln_1.weight"])
        qkv = a @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(T, heads, d) for t in qkv.split(proj, -1))
        q, k = rotary(q), rotary(k)
        if m["logn"]:
            q = q * logn[:, None, None]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, proj)
        x = x + out @ w[p + "attn.c_proj.weight"].T
        a = rms(x, w[p + "ln_2.weight"])
        inner = (a @ w[p + "mlp.w1.weight"].T) * torch.nn.functional.silu(a @ w[p + "mlp.w2.weight"].T)
        x = x + inner @ w[p + "mlp.c_proj.weight"].T
    return rms(x, w["transformer.ln_f.weight"])


def test_reference_is_causal_and_deterministic():
    """The reference itself: a prefix's logits do not depend on what follows (a broken mask would)."""
    import torch

    cfg = v1_config("2023-08", seq_length=16)
    sd = v1_weights(cfg)
    ids = list(range(100, 112))
    full, prefix = reference_logits(sd, cfg, ids), reference_logits(sd, cfg, ids[:5])
    assert torch.allclose(full[:5], prefix, atol=1e-10)
    assert not torch.allclose(full[5], reference_logits(sd, cfg, ids[:5] + [7])[5])
