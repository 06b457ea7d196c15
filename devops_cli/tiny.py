"""The tiny-model kit: a Qwen2-architecture model of a few MB and a byte-level BPE tokenizer trained
on the bundled DevOps corpus, saved with save_pretrained. Used by `make demo`, the tests and benches.

The BPE is trained with Qwen2's own normalizer (NFC) and pre-tokenizer (Qwen regex split + byte level),
so token ids are identical after a reload through AutoTokenizer (which re-applies Qwen's pre-tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from devops_cli.console import console
from devops_cli.convert.tokenizer import qwen_pipeline
from devops_cli.dataset_info import BUNDLED_DIR
from devops_cli.errors import DevopsError
from devops_cli.outputs import new_output_dir, staged_dir
from devops_cli.templates import CHATML

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


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


def train_tokenizer(vocab_size: int = 4096, texts=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = qwen_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts if texts is not None else bundled_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token=None, additional_special_tokens=SPECIAL[1:])
    fast.chat_template = CHATML
    return fast


def build(out_dir: str | Path, hidden_size: int = 128, num_layers: int = 2, vocab_size: int = 4096,
          intermediate_size: int | None = None, num_heads: int = 4, num_kv_heads: int = 2,
          max_position_embeddings: int = 4096, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a randomly initialised Qwen2ForCausalLM + tokenizer + generation config to out_dir."""
    out = new_output_dir(out_dir, overwrite, where=None, inputs={"bundled data": BUNDLED_DIR})
    for name, value, low, high in (("hidden_size", hidden_size, 8, 1 << 16), ("layers", num_layers, 1, 1024),
                                   ("vocab_size", vocab_size, 260, 1 << 20), ("seed", seed, 0, 2**32 - 1)):
        if not low <= value <= high:
            raise DevopsError(f"{name} {value} is out of range", f"--{name.replace('_', '-')}",
                              f"use {low}..{high}" + (" (256 bytes + 3 special tokens at least)" if name == "vocab_size" else ""))
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise DevopsError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer(vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        intermediate_size=intermediate_size or hidden_size * 3, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    # no pad_token_id, as in Qwen2's own configs: nn.Embedding would zero the row of <|endoftext|> (pt's
    # document separator) and never train it; the tokenizer and generation config name the pad token
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
        max_new_tokens=256, do_sample=False,
    )  # fmt: skip
    with staged_dir(out, where=None) as staged:  # whole or not at all: no config.json without weights
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
    return out


def tiny(
    output: Annotated[str, typer.Argument(help="directory for the model", show_default=False)],  # str: "" stays empty
    hidden_size: Annotated[int, typer.Option(help="hidden size (>= 128 for GPTQ group size 128)")] = 128,
    layers: Annotated[int, typer.Option(help="transformer layers")] = 2,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size")] = 4096,
    seed: Annotated[int, typer.Option(help="init seed")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty directory")] = False,
) -> None:
    """Build a tiny Qwen2 model + BPE tokenizer from the bundled corpus (smoke tests, demos)."""
    out = build(output, hidden_size=hidden_size, num_layers=layers, vocab_size=vocab_size, seed=seed,
                overwrite=overwrite)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    console.print(f"[green]tiny model[/] → {escape(str(out))} ({size:.1f} MB)")
