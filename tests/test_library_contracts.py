"""What devops-model relies on inside its libraries, one test per behaviour, each failure naming the
behaviour that changed: the next release that moves something is a one-line diagnosis, not a hunt.

(The run-time self-checks catch a changed behaviour on a user's machine; these catch it in CI first.)
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

TF = f"transformers {transformers.__version__}"
ARCHS = ["Qwen2", "Llama", "Mistral", "Qwen3"]  # scoring._PLAIN_LAYERS


def small(arch: str, **extra):
    config = getattr(transformers, f"{arch}Config")(vocab_size=97, hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2, head_dim=16, **extra)  # fmt: skip
    torch.manual_seed(0)
    return getattr(transformers, f"{arch}ForCausalLM")(config).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_cache_argument_is_found_on_every_forward_we_call(arch):
    from devops_cli.hfcompat import cache_kwarg, output_cache

    model = small(arch)
    names = {cache_kwarg(m) for m in (model, model.get_decoder(), model.get_decoder().layers[0])}
    assert len(names) == 1, f"{TF}: model, decoder and layer forwards take the KV cache under different names {names}"
    out = model.get_decoder()(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    cache = output_cache(out)
    assert cache is not None and cache.get_seq_length() == 3, f"{TF}: the decoder no longer returns its filled KV cache"


@pytest.mark.parametrize("arch", ARCHS)
def test_a_cache_passed_under_that_name_is_used(arch):
    """The guard against a rename that a forward's **kwargs would swallow: prefix + cached suffix must
    equal the whole sequence."""
    from devops_cli.hfcompat import cache_kwarg, output_cache

    model = small(arch)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        whole = model(input_ids=ids).logits[0, -1]
        cache = output_cache(model(input_ids=ids[:, :4], use_cache=True))
        part = model(input_ids=ids[:, 4:], use_cache=True, **{cache_kwarg(model): cache}).logits[0, -1]
    assert (whole - part).abs().max() < 1e-5, f"{TF}: a KV cache passed as '{cache_kwarg(model)}' is ignored"


def test_dynamic_cache_layers_are_what_the_scorer_expands():
    from transformers import DynamicCache

    model = small("Qwen2")
    cache = DynamicCache(config=model.config)
    assert len(cache.layers) == 2, f"{TF}: DynamicCache(config=...) no longer makes one layer object per decoder layer"
    layer = cache.layers[0]
    assert hasattr(layer, "lazy_initialization"), f"{TF}: cache layers have no lazy_initialization (eval/prefix.expand)"
    k = torch.zeros(1, 2, 3, 16)
    layer.lazy_initialization(k, k)
    layer.keys, layer.values = k.expand(4, -1, -1, -1), k.expand(4, -1, -1, -1)
    assert cache.get_seq_length() == 3, f"{TF}: a cache layer's length is no longer read from its .keys"
    filled = DynamicCache(ddp_cache_data=[(k, k), (k, k)], config=model.config)
    assert filled.layers[1].keys.shape == k.shape, f"{TF}: DynamicCache(ddp_cache_data=...) no longer fills the layers"


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_are_plain_pre_norm_blocks(arch):
    """scoring._LastTokenLayer recomputes the last layer from its parts: h + attn(norm1 h), then
    h + mlp(norm2 h); the attention from q/k/v/o, the module's apply_rotary_pos_emb and SDPA."""
    import sys

    from devops_cli.eval.scoring import _ATTN_PARTS

    model = small(arch)
    decoder = model.get_decoder()
    layer = decoder.layers[-1]
    attn = layer.self_attn
    missing = [a for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp") if not hasattr(layer, a)]
    missing += [a for a in _ATTN_PARTS if not hasattr(attn, a)]
    assert not missing, f"{TF}: {type(layer).__name__} lost {missing}"
    assert callable(getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)), \
        f"{TF}: {type(attn).__module__} has no module-level apply_rotary_pos_emb"  # fmt: skip
    h = torch.randn(1, 5, 64)
    pos = torch.arange(5)[None]
    pe = decoder.rotary_emb(h, pos)
    with torch.inference_mode():
        want = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        want = want[0] if isinstance(want, tuple) else want
        a, _ = attn(hidden_states=layer.input_layernorm(h), attention_mask=None, position_embeddings=pe)
        mid = h + a
        got = mid + layer.mlp(layer.post_attention_layernorm(mid))
    assert (want - got).abs().max() < 1e-5, f"{TF}: {type(layer).__name__}.forward is no longer attention-residual, MLP-residual"


def test_sdpa_reads_the_gqa_switch():
    """Without it the scorer's switch does nothing: slower, never wrong (the self-check covers it)."""
    from transformers.integrations import sdpa_attention

    from devops_cli.eval.scoring import GQA_SWITCH

    assert GQA_SWITCH in inspect.getsource(sdpa_attention), f"{TF}: SDPA no longer reads {GQA_SWITCH}"


# generate's processors, their order and its defaults (top_k 50) against decode.processors: by their
# tokens, greedy and seeded-sampled, in test_chat.py::test_decode_gives_generates_tokens


def test_warmup_steps_below_one_is_a_ratio():
    """train.training_arguments passes the recipe's warmup_ratio as warmup_steps (transformers 5)."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", warmup_steps=0.1, use_cpu=True, report_to=[])
    assert args.get_warmup_steps(200) == 20, f"{TF}: warmup_steps=0.1 no longer means 10% of the steps"


def test_gptq_internals_the_quantize_command_uses():
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from importlib.metadata import version

    from gptqmodel.utils import model as gptq_model
    from optimum.gptq import quantizer

    libs = f"optimum {version('optimum')}, gptqmodel {version('gptqmodel')}"
    params = list(inspect.signature(gptq_model.hf_convert_gptq_v2_to_v1_format).parameters)
    assert params[:6] == ["model", "sym", "bits", "qlinear_kernel", "checkpoint_format", "meta"], \
        f"{libs}: hf_convert_gptq_v2_to_v1_format takes {params} (quantize.gptq._save)"  # fmt: skip
    for name in ("tqdm", "has_device_more_than_cpu"):  # quantize._block_progress: display and device only
        assert hasattr(quantizer, name), f"{libs}: optimum.gptq.quantizer has no '{name}'"
