"""serve's two speed tricks inside transformers' continuous batching — attention per sequence
(serve/attention.py) and top-k/top-p without full sorts (serve/warpers.py) — against transformers' plain
paths: the same engine, the same requests (N concurrent sampled requests, temperature 0.3 as `data qa`
asks, a prompt of --prompt-tokens each), each run in a fresh process, alternating plain / ours.

    .venv/bin/python bench/serve_fast_paths.py [--concurrency 8] [--prompt-tokens 467] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(model: str, ours: bool, concurrency: int, prompt_tokens: int, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devops_cli.serve import attention, engine, warpers
    from devops_cli.tiny import bundled_texts

    if not ours:  # the baseline: transformers' packed sdpa and sorting warpers
        attention.install = lambda model: "transformers' packed sdpa"
        warpers.install = lambda manager, vocab, device: "transformers' top-k/top-p"
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    texts = [t for t in bundled_texts() if len(t) > 200]
    prompts = [(tok(t)["input_ids"] * (1 + prompt_tokens // 20))[:prompt_tokens] for t in texts[: 2 * concurrency]]

    async def main():
        eng = engine.BatchingEngine(lm, [], concurrency)
        try:
            async def one(ids):
                n = 0
                async for tokens in eng.stream(engine.Job(ids, max_tokens, temperature=0.3)):
                    n += len(tokens)
                return n

            await one(prompts[0][:32])  # warm
            started = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(ids) for ids in prompts)))
            return {"name": eng.name, "tokens": tokens, "seconds": time.perf_counter() - started}
        finally:
            eng.close()

    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=467, help="467: a `data qa` question prompt on the bundled corpus")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", choices=["plain", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker == "ours", args.concurrency, args.prompt_tokens, args.max_tokens)))
        return
    from devops_cli.tiny import build

    model = build(Path(tempfile.mkdtemp(prefix="bench-fast-paths-")) / "tiny")
    best: dict[str, float] = {}
    for kind in ("plain", "ours") * args.rounds:  # alternated: the machine's noise hits both
        r = subprocess.run([sys.executable, __file__, "--worker", kind, "--model", str(model), "--concurrency",
                            str(args.concurrency), "--prompt-tokens", str(args.prompt_tokens), "--max-tokens",
                            str(args.max_tokens)], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{kind} run failed:\n{r.stderr[-3000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        rate = out["tokens"] / out["seconds"]
        best[kind] = max(best.get(kind, 0.0), rate)
        print(f"{kind:5s}: {out['tokens']} tokens in {out['seconds']:.1f} s = {rate:.0f} tok/s  [{out['name']}]")
    print(f"{args.concurrency} concurrent requests, ours vs transformers' plain paths (best of {args.rounds}): "
          f"{best['ours']:.0f} / {best['plain']:.0f} = {best['ours'] / best['plain']:.2f}x")


if __name__ == "__main__":
    main()
