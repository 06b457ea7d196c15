"""GPTQ cost and quality of `devops-model quantize`: seconds, size ratio and perplexity delta.

    .venv/bin/python bench/quantize.py [--threads 1] [--train-steps 150] [--keep DIR]

Models, built here (nothing is downloaded):
  tiny      the tiny-kit Qwen2 (hidden 128, 2 layers, vocab 4096) trained --train-steps on the bundled corpus
  mid       a random Qwen2, 4 layers x hidden 512 (8 heads, 2 kv heads, intermediate 1536), untrained
  1.5b      (GPU only) a random Qwen2 shaped like Qwen2-1.5B (28 x 1536, vocab 151936), time per layer

Each is quantized by the real command path (devops_cli.quantize.run.run) at int4 and int8, calibrated on the
bundled DevOps corpus (128 samples x 1024 tokens asked; the tiny tokenizer's corpus holds fewer). Baseline
= the same fp16 model, measured in the same run: perplexity on the held-out blocks before quantizing, the
fp16 byte count of the quantized layers and of the whole model, and its logits (relative error of the
reloaded int-N logits). Absolute seconds are context: they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def train_tiny(out: Path, steps: int) -> Path:
    from devops_cli.tiny import build
    from kit import train_briefly  # tests/kit.py

    train_briefly(build(out / "base", hidden_size=128), out / "tiny", steps)
    return out / "tiny"


def random_qwen2(out: Path, hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int | None) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from devops_cli.tiny import train_tokenizer

    tok = train_tokenizer(4096)
    config = Qwen2Config(vocab_size=vocab or len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                         max_position_embeddings=4096, tie_word_embeddings=vocab is None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def logit_error(before: Path, after: Path, report: dict) -> float:
    """|logits_intN - logits_fp16| / |logits_fp16| on one held-out-sized block of the bundled corpus."""
    import torch

    from devops_cli.modeling import load_model, load_tokenizer
    from devops_cli.quantize.calibration import open_source, token_blocks

    seq = report["options"]["calib_seq_len"]
    blocks = token_blocks(open_source(None, None, "bundled", "-"), load_tokenizer(str(before)), seq, 1, 1)
    x = torch.tensor([blocks.held[0]])
    device = report["device"]
    with torch.no_grad():
        a = load_model(str(before), torch.float16).to(device)(input_ids=x.to(device)).logits.float()
        b = load_model(str(after), torch.float16).to(device)(input_ids=x.to(device)).logits.float()
    return ((b - a).norm() / a.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: the 2-core build box is shared; 2 threads there oversubscribe)")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--keep", type=Path, help="keep the models here (default: a temp dir)")
    args = ap.parse_args()

    import torch

    from devops_cli.quantize.run import QuantizeOptions, run

    torch.set_num_threads(args.threads)
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    root.mkdir(parents=True, exist_ok=True)
    models = {"tiny (128 x 2, trained)": train_tiny(root, args.train_steps),
              "mid (512 x 4, random)": random_qwen2(root / "mid", 512, 4, 8, 2, 1536, None)}
    gpu = torch.cuda.is_available()
    if gpu:
        models["1.5b-shaped (1536 x 28, random)"] = random_qwen2(root / "1.5b", 1536, 28, 12, 2, 8960, 151936)
    rows = []
    for name, path in models.items():
        for bits in (4, 8):
            out = root / f"{path.name}-int{bits}"
            r = run(QuantizeOptions(model=str(path), output=str(out), bits=bits, overwrite=True))
            rows.append((name, bits, r, logit_error(path, out, r)))
            print(f"{name} int{bits}: {r['seconds']['quantize']:.1f} s", file=sys.stderr)

    print(f"\ndevops-model quantize (optimum GPTQQuantizer on gptqmodel {rows[0][2]['versions']['gptqmodel']}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)); baseline = the same model in fp16")
    if not gpu:
        print("no GPU in this run: CPU only; the 1.5B-shaped model with time per layer needs one and was skipped")
    head = ("model", "bits", "calib", "quantize s", "s/block", "total s", "linears vs fp16", "ckpt vs fp16",
            "ppl fp16", "ppl intN", "ppl delta", "logit err")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for name, bits, r, err in rows:
        s, b, p, c = r["seconds"], r["bytes"], r["perplexity"], r["calibration"]
        print(" | ".join([name, str(bits), f"{c['samples']}x{c['seq_len']}", f"{s['quantize']:.1f}", f"{s['per_block']:.2f}",
                          f"{s['total']:.1f}", f"{b['linear_ratio']:.3f}x", f"{b['checkpoint_ratio_vs_fp16']:.3f}x",
                          f"{p['before']:.2f}", f"{p['after']:.2f}", f"{100 * p['increase']:+.2f} %", f"{err:.4f}"]))
    (root / "bench-quantize.json").write_text(json.dumps([{"model": n, "bits": bits, "logit_error": e, **r}
                                                          for n, bits, r, e in rows], indent=2))
    print(f"\nfull reports: {root / 'bench-quantize.json'}")


if __name__ == "__main__":
    main()
