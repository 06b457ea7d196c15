"""The tiny-model kit: a real Qwen2 model + tokenizer whose ids survive a reload."""

from __future__ import annotations


def test_tokenizer_ids_survive_reload_through_autotokenizer(tiny_model):
    from transformers import AutoTokenizer

    from devops_cli.tiny import train_tokenizer

    text = ("kubectl logs api-7d9f --previous | grep -i error\n容器因 OOMKilled 反复重启，检查 limits。\n"
            "  indented\tline\r\nemoji 🚀 and ＣＪＫ full-width, ⽤ radicals\n<|im_start|>user\nhi<|im_end|>")  # fmt: skip
    fresh = train_tokenizer()  # the same training, in memory
    loaded = AutoTokenizer.from_pretrained(tiny_model)
    assert type(loaded).__name__ == "Qwen2Tokenizer"  # transformers re-applies Qwen's pre-tokenizer
    assert loaded(text)["input_ids"] == fresh(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text.replace("ＣＪＫ", "ＣＪＫ")  # NFC keeps these


def test_model_shape_size_and_chat_generation(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert model.config.model_type == "qwen2" and model.config.hidden_size >= 128
    size = sum(f.stat().st_size for f in tiny_model.iterdir())
    assert 1e6 < size < 20e6, size
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert set(model.generation_config.eos_token_id) == set(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    assert torch.isfinite(model(**ids).logits).all()


def test_the_document_separator_trains(tiny_model):
    """<|endoftext|> ends every pt document; a config pad_token_id equal to it would make nn.Embedding
    zero that row and drop its gradient (padding_idx), as Qwen2's own configs never do."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    eos = tok.eos_token_id
    assert model.config.pad_token_id is None and model.generation_config.pad_token_id == tok.pad_token_id == eos
    row = model.get_input_embeddings().weight
    assert row[eos].abs().sum() > 0  # initialised like every other row
    ids = torch.tensor([tok("kubectl get pods")["input_ids"] + [eos] + tok("docker ps")["input_ids"]])
    model.model(input_ids=ids).last_hidden_state.sum().backward()  # the input side only
    assert row.grad[eos].abs().sum() > 0


def test_training_clears_a_pad_token_ids_frozen_embedding_row(tiny_model):
    """A user's model whose config names pad_token_id = eos: training makes that row trainable again."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from devops_cli.modeling import train_every_embedding

    config = AutoConfig.from_pretrained(tiny_model)
    config.pad_token_id = config.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_model, config=config)
    ids = torch.tensor([[5, 6, config.eos_token_id, 7, 8]])

    def separator_grad():
        model.zero_grad()
        model.model(input_ids=ids).last_hidden_state.sum().backward()
        return model.get_input_embeddings().weight.grad[config.eos_token_id].abs().sum().item()

    assert separator_grad() == 0  # nn.Embedding's padding_idx: this is what a pt run would get
    assert train_every_embedding(model) == config.eos_token_id
    assert separator_grad() > 0 and train_every_embedding(model) is None


import pytest  # noqa: E402

QWEN3_FAMILY = ["qwen3", "qwen3-moe", "qwen3.5"]


@pytest.mark.parametrize("arch", QWEN3_FAMILY)
def test_qwen3_family_models_carry_the_thinking_template_and_tokens(tiny_arch, arch):
    """Each Qwen3-family tiny model: its architecture, ids that survive a reload, <think>/<tool_call> as
    single added tokens that decode as text, <|im_end|> as eos, and Qwen3's hybrid-thinking template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devops_cli.tiny import THINK_TOKENS, train_tokenizer

    d = tiny_arch(arch)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    expected = {"qwen3": "Qwen3ForCausalLM", "qwen3-moe": "Qwen3MoeForCausalLM", "qwen3.5": "Qwen3_5ForCausalLM"}
    assert type(model).__name__ == expected[arch]
    text = "kubectl get pods -n 生产\n<think>\nwhy</think>\n\n<tool_call>\n{}\n</tool_call>"
    assert tok(text)["input_ids"] == train_tokenizer(arch=arch)(text)["input_ids"]
    for t in THINK_TOKENS:
        (i,) = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode([i], skip_special_tokens=True) == t  # not special: survives skip_special_tokens
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert tok.apply_chat_template(conv, tokenize=False) == (
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"  # earlier reasoning dropped
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\na2<|im_end|>\n")
    assert tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = tok("hello", return_tensors="pt")
    assert torch.isfinite(model(**ids).logits).all()
    if arch == "qwen3-moe":
        assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 2
    if arch == "qwen3.5":
        assert set(model.config.layer_types) == {"linear_attention", "full_attention"}


def test_tiny_refuses_an_unknown_arch(tmp_path, capsys):
    from devops_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(["tiny", str(tmp_path / "m"), "--arch", "llama"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'llama'" in err and "qwen3-moe" in err and not (tmp_path / "m").exists()
