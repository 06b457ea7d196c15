"""The tiny-model kit: a model of a few MB of each Qwen architecture devops-model supports (qwen2,
qwen3, qwen3-moe, qwen3.5) and a byte-level BPE tokenizer trained on the bundled DevOps corpus, saved with
save_pretrained. Used by `make demo`, the tests and benches.

Each arch gets its family's chat template and special tokens: qwen2 Qwen2-Instruct's ChatML; the Qwen3
family the hybrid-thinking template Qwen3's post-trained models ship (tools, <think> blocks), with
<think> </think> <tool_call> </tool_call> <tool_response> </tool_response> as added (non-special) tokens
and <|im_end|> as eos, as in Qwen3-8B. Qwen3.5's tiny model uses the same template (its own differs in
the tool-call syntax). The BPE is trained with the family's own normalizer (NFC) and pre-tokenizer, so
token ids are identical after a reload through AutoTokenizer (which re-applies them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from devops_cli.console import console
from devops_cli.convert.tokenizer import QWEN3_5_REGEX, QWEN_REGEX, qwen_pipeline
from devops_cli.dataset_info import BUNDLED_DIR
from devops_cli.errors import DevopsError
from devops_cli.outputs import new_output_dir
from devops_cli.templates import CHATML, QWEN3

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
ARCHES = ("qwen2", "qwen3", "qwen3-moe", "qwen3.5")


def bundled_texts():
    """Every text of the bundled sample data: corpus documents, QA turns, chat messages."""
    for path in sorted(BUNDLED_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if "text" in record:
                yield record["text"]
            for key in ("instruction", "input", "output"):
                if record.get(key):
                    yield record[key]
            for q, a in record.get("history") or []:
                yield q
                yield a
            for message in record.get("messages") or []:
                yield message["content"]


def train_tokenizer(vocab_size: int = 4096, texts=None, arch: str = "qwen2"):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = qwen_pipeline(Tokenizer(models.BPE()), QWEN3_5_REGEX if arch == "qwen3.5" else QWEN_REGEX)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts if texts is not None else bundled_texts(), trainer)
    if arch == "qwen2":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                       unk_token=None, additional_special_tokens=SPECIAL[1:])
        fast.chat_template = CHATML
        return fast
    # Qwen3: the thinking and tool markers are added tokens that decode as text (special: false)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, additional_special_tokens=SPECIAL[:2])
    fast.chat_template = QWEN3
    return fast


def _config(arch: str, vocab: int, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
            max_positions: int, eos: int):
    """The transformers config of a tiny model of `arch` (tied embeddings as in the small Qwen models)."""
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                  tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos)
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2Config(**common), Qwen2ForCausalLM
    if arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3Config(head_dim=hidden // heads, **common), Qwen3ForCausalLM
    if arch == "qwen3-moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        # 4 experts, 2 active, every layer sparse: the routing, fused expert weights and router of the real ones
        return Qwen3MoeConfig(head_dim=hidden // heads, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=intermediate // 2, decoder_sparse_step=1, mlp_only_layers=[],
                              norm_topk_prob=True, **common), Qwen3MoeForCausalLM
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    # Gated-DeltaNet linear attention and full attention alternating (3:1 in the real ones)
    layer_types = ["linear_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    return Qwen3_5TextConfig(head_dim=hidden // heads, layer_types=layer_types, linear_conv_kernel_dim=4,
                             linear_key_head_dim=hidden // heads, linear_value_head_dim=hidden // heads,
                             linear_num_key_heads=heads // 2, linear_num_value_heads=heads, **common), Qwen3_5ForCausalLM


def build(out_dir: str | Path, hidden_size: int = 128, num_layers: int = 2, vocab_size: int = 4096,
          intermediate_size: int | None = None, num_heads: int = 4, num_kv_heads: int = 2,
          max_position_embeddings: int = 4096, seed: int = 0, overwrite: bool = False, arch: str = "qwen2") -> Path:
    """Write a randomly initialised model of `arch` + tokenizer + generation config to out_dir."""
    out = Path(out_dir)
    if arch not in ARCHES:
        raise DevopsError(f"unknown architecture '{arch}'", "--arch", ", ".join(ARCHES))
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise DevopsError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    new_output_dir(out, overwrite, where=None)
    import torch
    from transformers import GenerationConfig

    tokenizer = train_tokenizer(vocab_size, arch=arch)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    # no pad_token_id, as in Qwen's own configs: nn.Embedding would zero the row of <|endoftext|> (pt's
    # document separator) and never train it; the tokenizer and generation config name the pad token
    config, model_class = _config(arch, len(tokenizer), hidden_size, num_layers, intermediate_size or hidden_size * 3,
                                  num_heads, num_kv_heads, max_position_embeddings, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
        max_new_tokens=256, do_sample=False,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # the tokenizer class the family's checkpoints name (AutoTokenizer re-applies its pre-tokenizer)
    tok_config = out / "tokenizer_config.json"
    saved = json.loads(tok_config.read_text(encoding="utf-8"))
    saved["tokenizer_class"] = "Qwen3_5Tokenizer" if arch == "qwen3.5" else "Qwen2Tokenizer"
    tok_config.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def tiny(
    output: Annotated[Path, typer.Argument(help="directory for the model")],
    hidden_size: Annotated[int, typer.Option(help="hidden size (>= 128 for GPTQ group size 128)")] = 128,
    layers: Annotated[int, typer.Option(help="transformer layers")] = 2,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size")] = 4096,
    seed: Annotated[int, typer.Option(help="init seed")] = 0,
    arch: Annotated[str, typer.Option(help="architecture: " + ", ".join(ARCHES) + " (Qwen3 family: Qwen3's "
                                            "thinking chat template and tokens)")] = "qwen2",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty directory")] = False,
) -> None:
    """Build a tiny Qwen-family model + BPE tokenizer from the bundled corpus (smoke tests, demos)."""
    out = build(output, hidden_size=hidden_size, num_layers=layers, vocab_size=vocab_size, seed=seed,
                overwrite=overwrite, arch=arch)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    console.print(f"[green]tiny {escape(arch)} model[/] → {escape(str(out))} ({size:.1f} MB)")
