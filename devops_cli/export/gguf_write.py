"""A transformers model -> one GGUF file, laid out as llama.cpp's qwen2 / qwen3 / qwen3moe loaders read it.

    config -> refused here if llama.cpp would run it differently (sliding window, an unknown RoPE
    scaling, MoE without top-k renormalisation or with dense layers) -> hyperparameters ->
    tokenizer (gguf_vocab) -> generation defaults (general.sampling.*) -> tensors: each HF tensor
    renamed by gguf-py's tensor name map (fused MoE experts split into gate / up), 1-D tensors F32,
    matrices in the asked type, streamed one at a time (a 14B model is never held twice).

Tensor names, shapes and metadata keys are facts from llama.cpp's loaders and gguf-py's tables; the
code is devops-model's own. F16 / BF16 / Q8_0 are written here with gguf-py's quantizers (what
llama.cpp's own converter writes); K-quants and Q4_0 come from llama.cpp's quantizer (llamacpp.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from devops_cli.errors import DevopsError

# HF model_type -> llama.cpp architecture (gguf's MODEL_ARCH member)
ARCHS = {"qwen2": "QWEN2", "qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE"}
# what --quant names -> how it is made: "direct" here, "llama.cpp" by llama_model_quantize from F16/BF16
QUANTS = {"f16": "direct", "bf16": "direct", "q8_0": "direct", "q4_0": "llama.cpp", "q4_k_m": "llama.cpp"}
F16_MAX = 65504.0


@dataclass
class Written:
    path: Path
    arch: str
    tensors: int
    params: int
    types: dict[str, int]  # GGML type name -> tensor count
    bytes: int


def architecture(config: dict, where: str = "--model") -> str:
    """llama.cpp's architecture for a model config, or one line on why it cannot be exported."""
    kind = config.get("model_type")
    if kind not in ARCHS:
        known = "qwen2 (Qwen2, Qwen2.5, CodeFuse DevOps-Model, converted Qwen v1), qwen3, qwen3_moe"
        extra = " (Qwen3.5's hybrid attention is not written by devops-model's GGUF writer)" if str(kind).startswith("qwen3_5") else ""
        raise DevopsError(f"model_type '{kind}' cannot be exported to GGUF{extra}", where, f"supported: {known}")
    if config.get("use_sliding_window"):
        raise DevopsError("use_sliding_window is true: llama.cpp's qwen2 runs full attention on every layer", where,
                          "export a model trained without sliding-window attention")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind_rope = rope.get("rope_type") or rope.get("type") or "default"
    if kind_rope not in ("default", "linear", "yarn"):
        raise DevopsError(f"RoPE scaling '{kind_rope}' has no GGUF equivalent here", where, "use default, linear or yarn")
    if kind == "qwen3_moe":
        if not config.get("norm_topk_prob", False):
            raise DevopsError("norm_topk_prob is false: llama.cpp's qwen3moe always renormalises the top-k expert "
                              "weights, so the GGUF would compute another model", where)  # fmt: skip
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise DevopsError("dense layers between the MoE layers (mlp_only_layers / decoder_sparse_step) are not in "
                              "llama.cpp's qwen3moe", where)  # fmt: skip
    return ARCHS[kind]


def write(path: Path, model, config: dict, vocab, quant: str, name: str, generation: dict | None) -> Written:
    """Write `model` (a loaded transformers model) as GGUF at `path` in type `quant` (f16 | bf16 | q8_0)."""
    import gguf
    import numpy as np

    arch = getattr(gguf.MODEL_ARCH, architecture(config))
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]  # fmt: skip
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    _hparams(writer, config)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(writer)
    _sampling(writer, generation or {})

    plan = tensor_plan(model, config, quant)
    for new, tensor, kind in plan:
        shape = tuple(tensor.shape)
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.dtype(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(new, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
            writer.add_tensor_info(new, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)

    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    types: dict[str, int] = {}
    params = 0
    for _new, tensor, kind in plan:  # one tensor in numpy at a time
        data = _encode(tensor, kind)
        params += tensor.numel()
        writer.write_tensor_data(data)
        types[kind.name] = types.get(kind.name, 0) + 1
    writer.close()
    return Written(path=path, arch=gguf.MODEL_ARCH_NAMES[arch], tensors=len(plan), params=params, types=types,
                   bytes=path.stat().st_size)  # fmt: skip


def tensor_plan(model, config: dict, quant: str) -> list:
    """[(GGUF name, tensor, GGML type)] in file order: 1-D tensors and norms F32, matrices in `quant`
    (F16 where a row does not split into the type's blocks)."""
    import gguf

    arch_name = architecture(config)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_name), config["num_hidden_layers"])
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]  # fmt: skip
    plan = []
    for hf_name, tensor in _hf_tensors(model, config):
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise DevopsError(f"tensor '{hf_name}' has no llama.cpp {arch_name.lower()} name", "--model",
                              "the model holds parts llama.cpp's loader does not know")  # fmt: skip
        kind = gguf.GGMLQuantizationType.F32 if tensor.dim() <= 1 or new.endswith("_norm.weight") else qtype
        if kind == gguf.GGMLQuantizationType.Q8_0 and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            kind = gguf.GGMLQuantizationType.F16  # rows that do not split into 32-value blocks
        if kind == gguf.GGMLQuantizationType.F16 and tensor.abs().max().item() > F16_MAX:
            raise DevopsError(f"'{hf_name}' holds values beyond float16's range (|x| > 65504)", "--quant",
                              "export with --quant bf16")  # fmt: skip
        plan.append((new, tensor, kind))
    return plan


def _encode(tensor, kind):
    """A tensor as the bytes (or float array) GGUF stores for GGML type `kind`."""
    import gguf
    import numpy as np

    data = tensor.detach().float().cpu().numpy()
    if kind == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, kind)


def round_in_place(model, config: dict, quant: str) -> None:
    """Give the in-memory model the weights its GGUF holds (each tensor through the file's type and
    back): the plain reference the reloaded GGUF must equal."""
    import gguf
    import torch

    with torch.no_grad():
        for _new, tensor, kind in tensor_plan(model, config, quant):
            if kind == gguf.GGMLQuantizationType.F32:
                back = tensor.float()
            elif kind == gguf.GGMLQuantizationType.F16:
                back = tensor.to(torch.float16)
            elif kind == gguf.GGMLQuantizationType.BF16:
                back = tensor.to(torch.bfloat16)
            else:
                back = torch.from_numpy(gguf.quants.dequantize(_encode(tensor, kind), kind)).reshape(tensor.shape)
            tensor.copy_(back.to(tensor.dtype))


def _hparams(writer, config: dict) -> None:
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind in ("linear", "yarn") and rope.get("factor"):
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings",
                                                                  config["max_position_embeddings"])))
    if config.get("model_type") == "qwen3_moe":
        writer.add_expert_count(config.get("num_local_experts") or config["num_experts"])  # transformers 5 | 4
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])


def _sampling(writer, generation: dict) -> None:
    """generation_config.json's defaults as general.sampling.* (llama.cpp reads them as its defaults)."""
    if generation.get("do_sample") is False:
        writer.add_sampling_temp(0.0)
    elif generation.get("temperature") is not None:
        writer.add_sampling_temp(float(generation["temperature"]))
    if generation.get("do_sample") is not False:
        if generation.get("top_p") is not None:
            writer.add_sampling_top_p(float(generation["top_p"]))
        if generation.get("top_k") is not None:
            writer.add_sampling_top_k(int(generation["top_k"]))
    if generation.get("repetition_penalty") not in (None, 1.0):
        writer.add_sampling_penalty_repeat(float(generation["repetition_penalty"]))


def _hf_tensors(model, config: dict):
    """(HF name, tensor) for every tensor llama.cpp loads: the tied lm_head is dropped (llama.cpp uses
    token_embd as the output matrix when output.weight is absent); fused expert gate_up is split."""
    tied = config.get("tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name.endswith("mlp.experts.gate_up_proj"):  # [experts, 2 * ff, hidden]: gate rows, then up rows
            base = name.removesuffix(".gate_up_proj")
            ff = tensor.shape[-2] // 2
            yield f"{base}.gate_proj.weight", tensor[..., :ff, :]
            yield f"{base}.up_proj.weight", tensor[..., ff:, :]
        elif name.endswith("mlp.experts.down_proj"):  # [experts, hidden, ff]
            yield f"{name}.weight", tensor
        else:
            yield name, tensor


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
