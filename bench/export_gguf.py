"""`devops-model export --format gguf`: export time and file size per GGUF type, and llama.cpp's decode
speed next to transformers' on the same prompt, in one run.

    .venv/bin/python bench/export_gguf.py [--threads 1] [--new-tokens 64] [--train-steps 150] [--skip-mid] [--keep DIR]

Models, built here (nothing is downloaded):
  tiny   the tiny-kit Qwen2 (hidden 128, 2 layers, vocab 4096) trained --train-steps on the bundled corpus
         (perplexity changes mean little on random weights)
  mid    a random Qwen2, 8 layers x hidden 1024 (16 heads, 4 kv heads, intermediate 2816), vocab 4096:
         the size and speed row (hidden 1024 splits into K-quant super-blocks of 256; 128 does not)

Each is exported by the real command path (devops_cli.export.run.run, every check included) to f16,
bf16, q8_0 and, with llama.cpp built, q4_0 and q4_k_m. Baselines measured in the same run: sizes
against the f16 file; decode speed against transformers on the source model (float32, greedy,
`--new-tokens` tokens after the same 64-token prompt, both on `--threads` threads); llama.cpp decodes the same
way (one token per eval, argmax of the logits), its prompt pass timed apart. Absolute seconds are
context: they depend on the machine and its load (one run, no repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

QUANTS = ["f16", "bf16", "q8_0", "q4_0", "q4_k_m"]


def transformers_speed(model_dir: Path, prompt: list[int], new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.tensor([prompt])
    with torch.no_grad():
        model.generate(input_ids=x[:, :4], max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model(input_ids=x)
        t1 = time.perf_counter()
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        t2 = time.perf_counter()
    return new_tokens / ((t2 - t1) - (t1 - t0))  # decode only: the generate call minus one prompt pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch's and llama.cpp's threads (1: the machine is shared)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-mid", action="store_true")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--keep", type=Path, help="keep the models and exports here")
    args = ap.parse_args()

    from devops_cli.console import quiet_imports
    from devops_cli.export import llamacpp, run
    from devops_cli.tiny import build

    quiet_imports()
    import torch

    torch.set_num_threads(args.threads)
    cpp = llamacpp.unavailable()
    quants = [q for q in QUANTS if cpp is None or q in ("f16", "bf16", "q8_0")]
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    models = {"tiny": dict(hidden_size=128, num_layers=2),
              "mid": dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4, intermediate_size=2816)}
    if args.skip_mid:
        models.pop("mid")
    rows = []
    for name, shape in models.items():
        src = work / name
        if not src.is_dir() and name == "tiny":
            from kit import train_briefly  # tests/kit.py

            train_briefly(build(work / "tiny-base", **shape), src, args.train_steps)
        elif not src.is_dir():
            build(src, **shape)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
        prompt = tok("kubectl get pods -A | grep -v Running; 检查所有命名空间里没有运行的 pod, then describe each one")["input_ids"]
        prompt = (prompt * 8)[:64]
        hf_tps = transformers_speed(src, prompt, args.new_tokens)
        base_bytes = None
        for quant in quants:
            out = work / f"{name}-{quant}"
            t0 = time.perf_counter()
            r = run.run(run.GGUFOptions(model=str(src), adapter=None, output=str(out), quant=quant, overwrite=True))
            seconds = time.perf_counter() - t0
            base_bytes = base_bytes or r["bytes"]["gguf"]
            speed = llamacpp.call({"job": "speed", "gguf": str(out / "model.gguf"), "prompt": prompt,
                                   "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}) if cpp is None else None  # fmt: skip
            p = r["checks"]["perplexity"]
            rows.append({"model": name, "params": r["params"], "quant": quant, "bytes": r["bytes"]["gguf"],
                         "size_vs_f16": r["bytes"]["gguf"] / base_bytes, "bits_per_weight": r["bytes"]["bits_per_weight"],
                         "export_seconds": seconds, "write_seconds": r["seconds"]["write"],
                         "verify_seconds": r["seconds"]["verify"], "ppl_increase": p["increase"],
                         "ppl_llamacpp_vs_transformers": (r["checks"]["llamacpp"].get("perplexity_vs_gguf_transformers")),
                         "transformers_tokens_per_second": hf_tps,
                         "llamacpp_tokens_per_second": speed and speed["tokens_per_second"],
                         "llamacpp_vs_transformers": speed and speed["tokens_per_second"] / hf_tps})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

    print()
    print(f"{'model':6} {'quant':7} {'MB':>8} {'vs f16':>7} {'bits/w':>7} {'export s':>9} {'ppl Δ':>9} "
          f"{'llama.cpp tok/s':>16} {'HF tok/s':>9} {'ratio':>6}")
    for r in rows:
        cpp_tps = f"{r['llamacpp_tokens_per_second']:.1f}" if r["llamacpp_tokens_per_second"] else "-"
        ratio = f"{r['llamacpp_vs_transformers']:.2f}x" if r["llamacpp_vs_transformers"] else "-"
        print(f"{r['model']:6} {r['quant']:7} {r['bytes'] / 1e6:8.2f} {r['size_vs_f16']:6.3f}x {r['bits_per_weight']:7.2f} "
              f"{r['export_seconds']:9.1f} {100 * r['ppl_increase']:+8.3f}% {cpp_tps:>16} "
              f"{r['transformers_tokens_per_second']:9.1f} {ratio:>6}")
    print(f"\n{args.threads} thread(s) each ({os.cpu_count()} CPUs); llama.cpp: {cpp or 'llama-cpp-python ' + run._versions()['llama-cpp-python']}; "
          f"models and exports in {work}")


if __name__ == "__main__":
    main()
