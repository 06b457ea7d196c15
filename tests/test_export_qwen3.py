"""`export` (LoRA merge) on the tiny Qwen3: the merged model keeps its chat template (it renders every
conversation as the base does, thinking on and off: merged Qwen3 models must not "think again") and
its generation_config's eos ids; the merge checks both and says so in one line when either changed."""

from __future__ import annotations

import json

import pytest

from devops_cli.cli import main

torch = pytest.importorskip("torch")

CHATS = [
    [{"role": "user", "content": "How do I restart a pod?"}],
    [{"role": "system", "content": "You are an SRE."}, {"role": "user", "content": "q1"},
     {"role": "assistant", "content": "<think>\nreasoning\n</think>\n\nanswer one"}, {"role": "user", "content": "q2"}],
]  # fmt: skip


@pytest.fixture(scope="module")
def adapter(tiny_arch, tmp_path_factory):
    """A LoRA adapter of the tiny Qwen3 (non-zero B, so the merge changes weights), saved with its
    tokenizer as sft saves it."""
    from peft import LoraConfig, get_peft_model

    from devops_cli.modeling import load_model, load_tokenizer

    base = tiny_arch("qwen3")
    out = tmp_path_factory.mktemp("adapter") / "lora"
    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(str(base), torch.float32),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(out)
    load_tokenizer(str(base)).save_pretrained(out)
    return base, out


def export(adapter_dir, output) -> int:
    with pytest.raises(SystemExit) as e:
        main(["export", "--adapter", str(adapter_dir), "--output", str(output)])
    return e.value.code


def test_merged_qwen3_keeps_template_and_generation_config(adapter, tmp_path):
    from devops_cli.modeling import load_tokenizer

    base, lora = adapter
    merged = tmp_path / "merged"
    assert export(lora, merged) in (0, None)
    tb, tm = load_tokenizer(str(base)), load_tokenizer(str(merged))
    for chat in CHATS:
        for thinking in (True, False):
            a, b = (t.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, enable_thinking=thinking)
                    for t in (tb, tm))  # fmt: skip
            assert a == b
    off = tm.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the switch survived the merge
    gen_base = json.loads((base / "generation_config.json").read_text())
    gen_merged = json.loads((merged / "generation_config.json").read_text())
    ids = tb.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert gen_merged["eos_token_id"] == gen_base["eos_token_id"] == ids
    assert tm.eos_token == "<|im_end|>"


@pytest.mark.parametrize("loss", ["template", "generation_config"])
def test_a_merge_that_loses_either_is_one_line(adapter, tmp_path, capsys, monkeypatch, loss):
    """What LLaMA-Factory users saw (an export writing another template, or no generation config),
    made to happen here: the merge stops with one line naming what changed."""
    import transformers

    from devops_cli.templates import CHATML

    base, lora = adapter
    if loss == "template":
        real = transformers.PreTrainedTokenizerBase.save_pretrained

        def save_other_template(self, *args, **kwargs):
            self.chat_template = CHATML  # a plain ChatML template: no enable_thinking switch
            return real(self, *args, **kwargs)

        monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", save_other_template)
    else:
        monkeypatch.setattr(transformers.GenerationConfig, "save_pretrained", lambda self, *a, **k: None)
    capsys.readouterr()
    assert export(lora, tmp_path / "merged") == 2
    err = capsys.readouterr().err
    assert ("renders chats differently from its source (enable_thinking=" if loss == "template"
            else "stops at eos ids None, its base at") in err  # fmt: skip
    assert "Traceback" not in err
