"""Eval speed on the 7B shape: the exam at 5 shots through `devops-model eval`'s scorer (shared-prefix KV
reuse, batched suffixes, with its run-time self-check on), against the plain one-question-at-a-time loop
(whole prompt, batch of one, the model's own forward) in the same process, on the same model.

    python bench/gpu/eval_speed.py [--shots 5] [--plain-budget 120] [--plan] [--result FILE]

The model is a random Qwen2 of Qwen2.5-7B's shape built on the GPU in bf16; the prompts are the real
exam's (when it travelled, else the bundled sample) tokenized by the kit's 4096-token BPE, so they are
longer than Qwen's own tokenizer makes them: tokens scored are reported. The plain loop visits the
questions interleaved across subjects and stops at --plain-budget seconds: its questions/s is then over
a representative part of the exam (said so). Ratio = fast questions/s / plain questions/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clock, device_and_dtype, exam, quiet, random_qwen2, shape, tokenizer, write_result  # noqa: E402


def interleaved(keys: list) -> list[int]:
    """Question indices taking one from each subject in turn: any prefix of this order is a fair sample."""
    by: dict = {}
    for i, k in enumerate(keys):
        by.setdefault(k, []).append(i)
    queues, order = list(by.values()), []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--plain-budget", type=float, default=120.0, help="seconds the plain loop may take at most")
    ap.add_argument("--plan", action="store_true", help="CPU dry mode: tiny shape, float32, 4 questions a subject")
    ap.add_argument("--result")
    args = ap.parse_args()
    quiet()
    import torch

    from devops_cli import guard
    from devops_cli.eval import prompts
    from devops_cli.eval import run as evaluate
    from devops_cli.eval.scoring import Scorer, predict

    device, dtype = device_and_dtype(args.plan)
    data, real, how = exam()
    o = evaluate.EvalOptions(model="random-qwen2-7b", shots=args.shots, data_dir=str(data),
                             subjects=None if real else "all", limit=4 if args.plan else None)  # fmt: skip
    tok = tokenizer()
    subjects = evaluate.load_exam(o)
    ids, keys, _ = evaluate.encode_all(tok, o, subjects, False)
    n, tokens = len(ids), sum(map(len, ids))
    t0 = time.perf_counter()
    model = random_qwen2(shape("7b", args.plan), tok, device, dtype)
    built = time.perf_counter() - t0
    scorer = Scorer(model, prompts.option_ids(tok, prompts.option_strings(o.protocol, False), "kit tokenizer"))

    # warm-up of both paths on a few questions (kernel selection, cuBLAS handles, allocator)
    warm = interleaved(keys)[:6]
    scorer.score([ids[i] for i in warm], [keys[i] for i in warm])
    for i in warm[:2]:
        scorer.reference(ids[i])

    t = clock(device)
    fast = scorer.score(ids, keys)
    fast_s = clock(device) - t
    used = scorer.used

    plain = {}
    t = clock(device)
    for i in interleaved(keys):
        plain[i] = scorer.reference(ids[i])
        if time.perf_counter() - t > args.plain_budget:
            break
    plain_s = clock(device) - t
    done = sorted(plain)
    ref = torch.stack([plain[i] for i in done])
    diff = (ref - fast[done]).abs().max().item()
    tol = guard.tolerance(dtype, ref, scorer.layers)
    differ = sum(a != b for a, b in zip(predict(ref), predict(fast[done])))
    fast_qps, plain_qps = n / fast_s, len(done) / plain_s
    figures = {"questions": n, "exam": how, "real_exam": real, "shots": args.shots, "tokens_scored": tokens,
               "model": "random Qwen2 " + ("7B shape" if not args.plan else "tiny stand-in (plan)"),
               "params": sum(p.numel() for p in model.parameters()), "device": str(device),
               "dtype": str(dtype).removeprefix("torch."), "scorer": used, "fast_s": fast_s, "fast_qps": fast_qps,
               "plain_questions": len(done), "plain_s": plain_s, "plain_qps": plain_qps, "ratio": fast_qps / plain_qps,
               "max_logit_diff": diff, "tolerance": tol, "predictions_differ": differ, "build_s": built}  # fmt: skip
    part = "" if len(done) == n else f" ({len(done)} of {n} questions, interleaved, in its {args.plain_budget:.0f} s budget)"
    lines = [f"eval {n} questions at {args.shots} shots ({tokens:,} prompt tokens), {figures['model']}, "
             f"{figures['dtype']} on {device}: scorer '{used}' {fast_s:.1f} s = {fast_qps:.1f} questions/s; plain "
             f"one-at-a-time loop {plain_qps:.2f} questions/s{part} -> {fast_qps / plain_qps:.1f}x; max |logit diff| "
             f"{diff:.2g} (tolerance {tol:.2g}), {differ} of {len(done)} predictions differ"]  # fmt: skip
    if not real:
        lines.append(how)
    write_result(args.result, {"figures": figures, "lines": lines})


if __name__ == "__main__":
    main()
