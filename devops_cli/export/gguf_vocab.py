"""The tokenizer in GGUF metadata, as llama.cpp's BPE tokenizer reads it: the byte-level vocabulary
(every id up to the model's vocab_size; ids the tokenizer lacks are UNUSED padding), the merges in
rank order, a type per token (NORMAL, CONTROL for special added tokens, USER_DEFINED for the other
added tokens such as Qwen3's <think>), the pre-tokenizer type, eos / end-of-turn / pad ids, no BOS
(Qwen adds none), and the chat template.

The pre-tokenizer type is read from tokenizer.json's own Split regex, not guessed from a hash of
sample encodings: llama.cpp implements a fixed set of pre-tokenizers, each keyed by name, and a
tokenizer whose regex is none of them is refused. Whether llama.cpp then tokenizes as the HF
tokenizer does is checked on real text after the file is written (checks.tokenizer_check).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from devops_cli.errors import DevopsError

# the Split regex of each pre-tokenizer llama.cpp implements that a Qwen-family tokenizer uses
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
PRE_TOKENIZERS = {QWEN2_REGEX: "qwen2"}
# the end-of-turn markers of the chat templates devops-model knows (the Modelfile's stop tokens too)
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")

NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4  # gguf.TokenType values


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    eos_id: int
    pad_id: int | None
    eot_id: int | None
    chat_template: str | None
    special: dict[str, int] = field(default_factory=dict)  # control tokens by text

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        writer.add_eos_token_id(self.eos_id)
        if self.pad_id is not None:
            writer.add_pad_token_id(self.pad_id)
        if self.eot_id is not None:
            writer.add_eot_token_id(self.eot_id)
        writer.add_add_bos_token(False)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def pre_tokenizer(tokenizer_json: dict, where: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (a Split regex then ByteLevel)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = any(p.get("type") == "ByteLevel" for p in parts)
    if len(regexes) == 1 and byte_level and regexes[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[regexes[0]]
    raise DevopsError(f"the tokenizer's pre-tokenizer is not Qwen2's byte-level BPE split ({where}/tokenizer.json)",
                      "--model", "GGUF export supports the Qwen2 / Qwen3 tokenizer; llama.cpp would tokenize "
                      "this one differently")  # fmt: skip


def read(tokenizer, source: str, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of a fast HF tokenizer (loaded from `source`) for a model of vocab_size rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DevopsError(f"the tokenizer of '{source}' is not a fast (tokenizer.json) tokenizer", "--model",
                          "GGUF holds the tokenizer: export needs the model's tokenizer.json")
    data = json.loads(backend.to_str())
    path = f"{source}/tokenizer.json"
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise DevopsError(f"the tokenizer is {model.get('type')}, not BPE ({path})", "--model",
                          "GGUF export supports Qwen's byte-level BPE tokenizer")
    pre = pre_tokenizer(data, source)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if any(len(m.split(" ")) != 2 for m in merges):
        raise DevopsError(f"a merge in {path} holds a space, which GGUF's 'a b' merge format cannot carry")

    vocab = tokenizer.get_vocab()
    if len(vocab) < 256:  # transformers builds an empty tokenizer for a folder that has none
        raise DevopsError(f"the tokenizer of '{source}' has {len(vocab)} tokens (a byte-level BPE has at least 256)",
                          "--model", "save the model's own tokenizer beside it")  # fmt: skip
    if max(vocab.values()) >= vocab_size:
        raise DevopsError(f"the tokenizer has ids up to {max(vocab.values())}, the model's embedding only {vocab_size} rows",
                          "--model", "the tokenizer does not belong to this model")  # fmt: skip
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types, special = [], [], {}
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(text)
        if text in added and added[text].special:
            types.append(CONTROL)
            special[text] = i
        elif text in added:
            types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DevopsError("the tokenizer has no eos_token", "--model", "set eos_token in its tokenizer_config.json")
    eot = vocab.get("<|im_end|>")
    return Vocab(tokens=tokens, types=types, merges=merges, pre=pre, eos_id=eos,
                 pad_id=tokenizer.pad_token_id, eot_id=eot if eot is not None and eot != eos else None,
                 chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
                 special=special)  # fmt: skip
