"""What a model is made of, from its config.json alone (no weights, no torch): parameter counts, the
linear layers LoRA adapts, what one token keeps for backward. Dense decoders (Qwen2/2.5/3, Llama,
Mistral; Qwen v1 through its conversion), mixture-of-experts ones (Qwen3-MoE: routed experts, an
optional shared expert, total vs active parameters) and hybrid linear attention (Qwen3.5: Gated
DeltaNet layers beside full-attention ones). Used by the memory plan (memory.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from devops_cli.sources import is_qwen_v1

# Shapes of the hub models the shipped recipes name, for when their config.json is neither a local
# folder nor in the hub cache (the fields of the models' published config.json files that the plan reads).
KNOWN = {
    "Qwen/Qwen2.5-7B": {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                        "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                        "tie_word_embeddings": False},
    "Qwen/Qwen2.5-14B": {"model_type": "qwen2", "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
                         "num_key_value_heads": 8, "intermediate_size": 13824, "vocab_size": 152064,
                         "tie_word_embeddings": False},
    "Qwen/Qwen3-8B": {"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                      "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
                      "tie_word_embeddings": False, "attention_bias": False},
    "Qwen/Qwen3-14B": {"model_type": "qwen3", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                       "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 17408, "vocab_size": 151936,
                       "tie_word_embeddings": False, "attention_bias": False},
    "Qwen/Qwen3-30B-A3B": {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
                           "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                           "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
                           "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
                           "vocab_size": 151936, "tie_word_embeddings": False, "attention_bias": False},
}  # fmt: skip
# the chat models share their base's shape (Qwen2.5: -Instruct; Qwen3's post-trained models are the plain
# names above, its base models -Base)
KNOWN.update({f"{name}-Instruct": shape for name, shape in KNOWN.items() if "Qwen2.5" in name})
KNOWN.update({f"{name}-Base": shape for name, shape in KNOWN.items() if "Qwen3-" in name})


def model_config(name: str) -> tuple[dict | None, str]:
    """(config.json of the model, where it was read), from a local folder, the hub cache, or the table
    of known models; (None, why) when none has it."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text(encoding="utf-8")), str(path / "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id, no cache
        cached = None
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8")), f"the hub cache ({cached})"
    if name in KNOWN:
        return KNOWN[name], "devops-model's table of known models (its config.json is not on this machine)"
    return None, f"no config.json for '{name}' on this machine"


@dataclass
class Shape:
    """A decoder-only transformer's sizes."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    o_bias: bool = False
    mlp_bias: bool = False
    # mixture of experts: layers whose MLP is `experts` routed experts (+ a shared expert), k active a token
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    sparse_layers: int = 0
    # hybrid linear attention (Qwen3.5's Gated DeltaNet): (key heads, key dim, value heads, value dim, conv kernel)
    linear_layers: int = 0
    linear_attention: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    attn_gate: bool = False  # Qwen3.5's full attention: q_proj also emits the output gate

    @classmethod
    def from_config(cls, c: dict) -> Shape:
        if is_qwen_v1(c):  # Qwen v1: sized as the Qwen2 model it is converted to
            from devops_cli.convert.qwen_v1 import qwen2_config

            c = {**qwen2_config(c, Path("config.json")), "model_type": "qwen2"}
        c = c.get("text_config") or c  # vision-language checkpoints (Qwen3.5) nest the language model
        heads, layers = c["num_attention_heads"], c["num_hidden_layers"]
        kind = c.get("model_type", "")
        experts = int(c.get("num_experts") or c.get("num_local_experts") or 0)
        step = int(c.get("decoder_sparse_step") or 1)
        dense_only = set(c.get("mlp_only_layers") or [])
        sparse = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0) if experts else 0
        types = c.get("layer_types") or []
        linear = sum(t == "linear_attention" for t in types)
        return cls(hidden=c["hidden_size"], layers=layers, heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   intermediate=c.get("intermediate_size") or 0, vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)),
                   qkv_bias=kind == "qwen2" or bool(c.get("attention_bias", False)),
                   qk_norm=kind.startswith("qwen3"), o_bias=bool(c.get("attention_bias", False)),
                   mlp_bias=bool(c.get("mlp_bias", False)), experts=experts,
                   experts_per_token=int(c.get("num_experts_per_tok") or 0),
                   moe_intermediate=int(c.get("moe_intermediate_size") or 0),
                   shared_intermediate=int(c.get("shared_expert_intermediate_size") or 0) if experts else 0,
                   sparse_layers=sparse, linear_layers=linear,
                   linear_attention=(c.get("linear_num_key_heads") or 0, c.get("linear_key_head_dim") or 0,
                                     c.get("linear_num_value_heads") or 0, c.get("linear_value_head_dim") or 0,
                                     c.get("linear_conv_kernel_dim") or 0) if linear else (0, 0, 0, 0, 0),
                   attn_gate=bool(c.get("attn_output_gate", kind.startswith("qwen3_5"))))  # fmt: skip

    # --- the pieces of one layer: (in, out) of its linear layers, and its other parameters ------------
    @property
    def attention_linears(self) -> list[tuple[int, int]]:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(h, q * (2 if self.attn_gate else 1)), (h, kv), (h, kv), (q, h)]

    @property
    def linear_attention_linears(self) -> list[tuple[int, int]]:
        nk, dk, nv, dv, _ = self.linear_attention
        h = self.hidden
        return [(h, 2 * nk * dk + nv * dv), (h, nv * dv), (h, nv), (h, nv), (nv * dv, h)]

    @property
    def dense_mlp_linears(self) -> list[tuple[int, int]]:
        h, i = self.hidden, self.intermediate
        return [(h, i), (h, i), (i, h)]

    @property
    def shared_expert_linears(self) -> list[tuple[int, int]]:
        h, s = self.hidden, self.shared_intermediate
        return [(h, s), (h, s), (s, h), (h, 1)] if s else []  # + its gate

    @property
    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one dense decoder layer."""
        return self.attention_linears + self.dense_mlp_linears

    def _attention_params(self, linear: bool) -> int:
        if linear:
            nk, dk, nv, dv, kernel = self.linear_attention
            return sum(i * o for i, o in self.linear_attention_linears) + (2 * nk * dk + nv * dv) * kernel + dv + 2 * nv
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = (q + 2 * kv if self.qkv_bias else 0) + (self.hidden if self.o_bias else 0)
        return sum(i * o for i, o in self.attention_linears) + bias + (2 * self.head_dim if self.qk_norm else 0)

    def _mlp_params(self, sparse: bool, active: bool = False) -> int:
        h = self.hidden
        if not sparse:
            bias = 2 * self.intermediate + h if self.mlp_bias else 0
            return sum(i * o for i, o in self.dense_mlp_linears) + bias
        n = self.experts_per_token if active else self.experts
        return h * self.experts + n * 3 * h * self.moe_intermediate + sum(i * o for i, o in self.shared_expert_linears)

    def _layer_kinds(self) -> list[tuple[bool, bool, int]]:
        """(linear attention, sparse MLP, how many layers) — counts only: where each sits does not matter here."""
        full, dense = self.layers - self.linear_layers, self.layers - self.sparse_layers
        # pair them up proportionally; sums over layers are all that is computed from these
        out = []
        for linear, n_attn in ((False, full), (True, self.linear_layers)):
            for sparse, n_mlp in ((False, dense), (True, self.sparse_layers)):
                n = n_attn * n_mlp / self.layers
                if n:
                    out.append((linear, sparse, n))
        return out

    @property
    def layer_params(self) -> int:
        """The largest decoder layer's parameters."""
        return max(self._attention_params(lin) + self._mlp_params(sp) + 2 * self.hidden for lin, sp, _ in self._layer_kinds())

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    def _decoder(self, active: bool = False) -> int:
        return round(sum(n * (self._attention_params(lin) + self._mlp_params(sp, active) + 2 * self.hidden)
                         for lin, sp, n in self._layer_kinds()))

    @property
    def params(self) -> int:
        return self.embedding * (1 if self.tied else 2) + self._decoder() + self.hidden

    @property
    def active_params(self) -> int:
        """Parameters one token runs through (a MoE runs k of its experts; equal to params when dense)."""
        return self.embedding * (1 if self.tied else 2) + self._decoder(active=True) + self.hidden

    @property
    def largest_module(self) -> int:
        """The largest single module's parameters (what ZeRO-3 gathers at once): the embedding, or a layer."""
        return max(self.embedding, self.layer_params)

    def _adapted(self, linear: bool, sparse: bool) -> list[tuple[int, int]]:
        """The nn.Linear layers of one layer that lora_target: all adapts."""
        attn = self.linear_attention_linears if linear else self.attention_linears
        return attn + (self.shared_expert_linears if sparse else self.dense_mlp_linears)

    @property
    def quantizable(self) -> int:
        """Weights of the decoder's nn.Linear layers (what bitsandbytes quantizes; fused experts and routers
        are not nn.Linear and stay in half precision)."""
        return round(sum(n * sum(i * o for i, o in self._adapted(lin, sp)) for lin, sp, n in self._layer_kinds()))

    @property
    def lora_dropout_elements(self) -> float:
        """Per token and layer (averaged over layers): the inputs of the adapted linears (LoRA dropout keeps
        a copy; fused experts take no dropout)."""
        return sum(n * sum(i for i, _ in self._adapted(lin, sp)) for lin, sp, n in self._layer_kinds()) / self.layers

    def lora_params(self, rank: int) -> int:
        """lora_target: all — every linear layer, and on a MoE the router (r x (hidden + experts)) and each
        expert's gate_up (rank 2r, as peft fuses gate and up) and down projections."""
        total = 0.0
        for linear, sparse, n in self._layer_kinds():
            per = rank * sum(i + o for i, o in self._adapted(linear, sparse))
            if sparse:
                h, mi, e = self.hidden, self.moe_intermediate, self.experts
                per += rank * (h + e) + e * (2 * rank * (h + 2 * mi) + rank * (mi + h))
            total += n * per
        return round(total)

    def activation_elements(self, checkpointing: bool) -> float:
        """Elements kept for backward per token, for all layers: without checkpointing each layer's norm
        inputs and outputs, q/k/v (or the linear attention's projections), attention output, o_proj input,
        gate/up/act/product (a MoE: of each active expert, with its routed input and output, and the
        router logits); with it each layer's input, plus one layer's worth while it is recomputed."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        nk, dk, nv, dv, _ = self.linear_attention
        per = []
        for linear, sparse, n in self._layer_kinds():
            attn = 2 * (2 * nk * dk + nv * dv) + 2 * nv * dv if linear else 3 * q + 2 * kv
            mlp = (self.experts_per_token * (4 * self.moe_intermediate + 2 * self.hidden) + self.experts
                   + 4 * self.shared_intermediate) if sparse else 4 * self.intermediate
            per.append((n, 6 * self.hidden + attn + mlp))
        one = max(e for _, e in per)
        return self.layers * self.hidden + one if checkpointing else sum(n * e for n, e in per)
