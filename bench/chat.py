"""Chat streaming overhead: time to first token and decode tokens/s of `devops-model chat`'s
ChatSession against plain `model.generate` on the same prompt and model, as ratios (goal >= 0.95).

    .venv/bin/python bench/chat.py [--tokens 128] [--repeat 5] [--threads N]

Models: the tiny kit model (2 layers x 128) and a mid-size random Qwen2 (4 layers x 512), both built
here in a temporary directory. Baseline and chat runs alternate; the median of the repeats counts.
  baseline TTFT   = generate(max_new_tokens=1) on pre-tokenized ids (prefill + first token); "+tmpl"
                    adds tokenizer.apply_chat_template(messages) as plain transformers code must
  baseline decode = (N - 1) / (time of generate(N) - time of generate(1)), greedy, N forced
  chat TTFT       = ChatSession.send: template + tokenize + thread start + prefill -> first token in hand
  chat decode     = (N - 1) / (last token - first token), same N, streamed and decoded as the REPL does;
                    "plain" writes the text as without a terminal, "markdown" renders it with rich Live.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOG = "\n".join(f"2024-05-01T10:00:{i:02d} INFO worker-{i % 4} handled request {i} in {i * 7 % 50} ms"
                for i in range(20)) + "\n2024-05-01T10:00:20 ERROR OOMKilled: container exceeded 512Mi"
QUESTION = "Why does this pod keep restarting, and how do I fix it?\n\n```\n" + LOG + "\n```"


def build_models(work: Path) -> list[tuple[str, Path]]:
    from devops_cli.tiny import build

    return [("tiny 2x128", build(work / "tiny")),
            ("mid 4x512", build(work / "mid", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4))]


def bench_model(label: str, path: Path, tokens: int, repeat: int) -> dict:
    import torch
    from rich.console import Console

    from devops_cli.chat.command import load
    from devops_cli.chat.render import ReplyView
    from devops_cli.chat.session import ChatSession
    from devops_cli.chat.settings import settings_from
    from devops_cli.templates import DEFAULT_SYSTEM

    model, tok, name = load(str(path), None, "float32", "cpu")
    session = ChatSession(model, tok, model_name=name, settings=settings_from(model.generation_config, {}),
                          system=DEFAULT_SYSTEM, seed=0)
    session.settings.update(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    _, ids, _ = session.prepare(QUESTION)
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)

    def plain_generate(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, eos_token_id=session.stop_ids, pad_token_id=tok.pad_token_id)
        assert out.shape[1] - input_ids.shape[1] == n
        return time.perf_counter() - start

    messages = session.messages(QUESTION)

    def templated_generate() -> float:
        start = time.perf_counter()
        x = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            model.generate(**x, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - start

    def chat(markdown: bool) -> tuple[float, float]:
        session.clear()
        sink = io.StringIO()
        console = Console(file=sink, force_terminal=markdown, width=100, height=40)
        with ReplyView(console, markdown=markdown, out=sink) as view:
            reply = session.send(QUESTION, view.update)
        assert reply.completion_tokens == tokens, reply.completion_tokens
        return reply.first_token_seconds, (tokens - 1) / (reply.seconds - reply.first_token_seconds)

    plain_generate(4), templated_generate(), chat(False), chat(True)  # warm-up
    rows: dict[str, list[float]] = {k: [] for k in ("base_ttft", "tmpl_ttft", "base_tps", "plain_ttft", "plain_tps",
                                                    "md_ttft", "md_tps")}
    def baseline() -> None:
        t1, tn = plain_generate(1), plain_generate(tokens)
        rows["tmpl_ttft"].append(templated_generate())
        rows["base_ttft"].append(t1)
        rows["base_tps"].append((tokens - 1) / (tn - t1))

    def ours() -> None:
        for key, markdown in (("plain", False), ("md", True)):
            ttft, tps = chat(markdown)
            rows[f"{key}_ttft"].append(ttft)
            rows[f"{key}_tps"].append(tps)

    for i in range(repeat):  # alternate which side goes first: drift on a shared machine hits both
        for side in (baseline, ours) if i % 2 == 0 else (ours, baseline):
            side()
    result = {k: statistics.median(v) for k, v in rows.items()}
    result.update(label=label, prompt_tokens=len(ids))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per run (forced)")
    ap.add_argument("--repeat", type=int, default=5, help="alternating runs per side; the median counts")
    ap.add_argument("--threads", type=int, help="torch threads (on a busy shared machine 1 avoids spin-waits)")
    args = ap.parse_args()
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, "
          f"median of {args.repeat}")
    header = (f"{'model':<11} {'prompt':>6} {'TTFT base':>10} {'+tmpl':>8} {'chat':>8} {'ratio':>6} {'r+tmpl':>6} | "
              f"{'decode tok/s base':>17} {'chat plain':>10} {'ratio':>6} {'chat md':>8} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp))
        print(header)
        for label, path in models:
            r = bench_model(label, path, args.tokens, args.repeat)
            print(f"{r['label']:<11} {r['prompt_tokens']:>6} {r['base_ttft'] * 1000:>8.1f}ms "
                  f"{r['tmpl_ttft'] * 1000:>6.1f}ms {r['plain_ttft'] * 1000:>6.1f}ms {r['base_ttft'] / r['plain_ttft']:>6.3f} "
                  f"{r['tmpl_ttft'] / r['plain_ttft']:>6.3f} | {r['base_tps']:>17.1f} {r['plain_tps']:>10.1f} "
                  f"{r['plain_tps'] / r['base_tps']:>6.3f} {r['md_tps']:>8.1f} {r['md_tps'] / r['base_tps']:>6.3f}",
                  flush=True)
    print("ratios: chat / plain generate (TTFT: base / chat, so higher is better for both); goal >= 0.95")


if __name__ == "__main__":
    main()
