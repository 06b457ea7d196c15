"""What the GPU kit's steps share: the model shapes, where the exam is, building a random Qwen2 of a
shape (in memory on a device, or saved), the bf16 peak, timing and the step's result file.

Every step is its own process (`python bench/gpu/STEP.py --result FILE [--plan]`), so a step that
overruns can be cut without losing the others; `--plan` is the CPU dry mode: tiny shapes, float32.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "bench", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from train_gpu import PEAK_BF16, SHAPES  # noqa: E402  (bench/train_gpu.py: Qwen2.5 shapes, dense bf16 peaks)

# the CPU dry mode's stand-ins for 7b / 1.5b: same code paths, seconds on 2 cores
TINY = {"7b": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=4096),
        "1.5b": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=4096)}  # fmt: skip

EXAM_ENV = "DEVOPS_EXAM_DIR"


def shape(name: str, plan: bool) -> dict:
    return dict((TINY if plan else SHAPES)[name])


def exam() -> tuple[Path, bool, str]:
    """(folder, is it the real 574-question exam, how it was found). Looked for in $DEVOPS_EXAM_DIR,
    .exam/ (a link to the exam that the device tool's carry brings along), shared/ in the checkout, and
    ../shared beside it; else the bundled sample exam, said so."""
    from kit import BUNDLED_EXAM

    candidates = [(os.environ.get(EXAM_ENV), f"${EXAM_ENV}"), (ROOT / ".exam", ".exam (carried)"),
                  (ROOT / "shared" / "data" / "devops-exam", "shared/ in the checkout"),
                  (ROOT.parent / "shared" / "data" / "devops-exam", "../shared")]  # fmt: skip
    for path, how in candidates:
        if path and (Path(path) / "cmmlu" / "test").is_dir() and (Path(path) / "ceval" / "val").is_dir():
            return Path(path), True, f"the DevOps exam from {how}: {Path(path).resolve()}"
    return BUNDLED_EXAM, False, ("the 574-question DevOps exam did not travel (no $DEVOPS_EXAM_DIR, .exam/, shared/ "
                                 "or ../shared): using the bundled sample exam (22 questions, 2 subjects)")  # fmt: skip


def device_and_dtype(plan: bool):
    import torch

    if plan:
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        sys.exit("this step needs CUDA (or --plan for the CPU dry mode)")
    return torch.device("cuda"), torch.bfloat16


def tokenizer():
    """The tiny kit's byte-level BPE (4096 tokens, ChatML): ids stay below every shape's vocabulary."""
    from devops_cli.tiny import train_tokenizer

    return train_tokenizer()


def random_qwen2(cfg: dict, tok, device, dtype, seed: int = 0, tied: bool = False):
    """A Qwen2ForCausalLM of this shape with random weights, built directly on `device` in `dtype`
    (nothing is downloaded; a 7B shape takes seconds on a GPU), with a chat generation config.
    tied: input and output embeddings shared (Qwen2.5-1.5B ties them, 7B does not)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from devops_cli.tiny import SPECIAL

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2Config(**cfg, max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=tied, bos_token_id=None,
                         eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])  # fmt: skip
    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    model.generation_config = GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                                               pad_token_id=ids["<|endoftext|>"], max_new_tokens=256, do_sample=False)
    return model.eval()


def saved_qwen2(path: Path, cfg: dict, plan: bool, tied: bool = False) -> tuple[Path, int]:
    """The random model of this shape saved to `path` (bf16 built on the GPU; float32 on CPU in plan
    mode), for the training launches. Returns (path, parameters)."""
    import torch

    marker = path / "params.json"
    if marker.is_file():
        return path, json.loads(marker.read_text())["params"]
    tok = tokenizer()
    device, dtype = (torch.device("cpu"), torch.float32) if plan else (torch.device("cuda"), torch.bfloat16)
    model = random_qwen2(cfg, tok, device, dtype, tied=tied)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    tok.save_pretrained(path)
    marker.write_text(json.dumps({"params": params}))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return path, params


def peak_flops(plan: bool) -> tuple[float | None, str]:
    """Dense bf16 peak of this GPU (FLOP/s) and its name; None on CPU or an unknown GPU."""
    import torch

    if plan or not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None), name


def sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def clock(device) -> float:
    sync(device)
    return time.perf_counter()


def write_result(path: str | None, result: dict) -> None:
    """The step's figures for the kit's report (a JSON file), and one line per figure on stdout."""
    for line in result.get("lines", []):
        print(line, flush=True)
    if path:
        Path(path).write_text(json.dumps(result, indent=1, default=str) + "\n")


def quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
