"""Qwen's tokenizer as the fast `tokenizers` library runs it.

QWEN_REGEX is Qwen's pre-tokenizer split (Qwen v1's tiktoken pattern, kept by Qwen2), shared with the tiny
kit; build_tokenizer turns Qwen v1's qwen.tiktoken into a tokenizer.json that encodes exactly as tiktoken
does with that regex and NFC, special tokens at their v1 ids.
"""

from __future__ import annotations

import base64
from pathlib import Path

from devops_cli.errors import DevopsError
from devops_cli.templates import CHATML

QWEN_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen3.5's split (its tokenizer class re-applies it on load): letters followed by combining marks stay whole
QWEN3_5_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
SPECIAL_START = 151643  # <|endoftext|>; the 151,643 BPE ranks come first


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks, n = {}, 0
    try:
        for n, line in enumerate(path.read_bytes().splitlines(), 1):  # noqa: B007 (n names the bad line)
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, OSError) as e:
        raise DevopsError(f"{path}:{n}: not a tiktoken vocabulary line ({e})") from None
    if sorted(ranks.values()) != list(range(SPECIAL_START)):
        raise DevopsError(f"{path}: expected ranks 0..{SPECIAL_START - 1}, got {len(ranks)} entries")
    return ranks


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """tiktoken's byte-pair merge (lowest-ranked adjacent pair first) run on the token's own bytes."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        found = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
        best, i = min(found)
        if best >= rank:
            raise DevopsError(f"qwen.tiktoken: token {rank} cannot be built from lower-ranked tokens")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def qwen_pipeline(tok, regex: str = QWEN_REGEX):
    """A `tokenizers.Tokenizer` with Qwen's text pipeline: NFC, the Qwen regex split, byte-level BPE pieces.
    Qwen2Tokenizer re-applies exactly this on load (Qwen3_5Tokenizer with QWEN3_5_REGEX), so ids survive a
    save/reload."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    return tok


def build_tokenizer(tiktoken_file: Path):
    """qwen.tiktoken -> a fast tokenizer that encodes exactly like tiktoken with Qwen's regex and NFC."""
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_ranks(tiktoken_file)
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    merges = []  # one per token, in rank order: the last merge tiktoken makes when it encodes the token
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            pair = _last_merge(token, rank, ranks)
            merges.append((text(pair[0]), text(pair[1])))
    bpe = models.BPE({text(t): r for t, r in ranks.items()}, merges, fuse_unk=False,
                     ignore_merges=True)  # a piece that is a token is that token, as in tiktoken
    tok = qwen_pipeline(Tokenizer(bpe))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert tok.token_to_id("<|extra_204|>") == SPECIAL_START + len(SPECIALS) - 1
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token=None, model_max_length=10**9)
    fast.chat_template = CHATML
    return fast
