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
