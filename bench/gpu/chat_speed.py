"""Chat speed on the 7B shape: time to first token and decode tokens/s of `devops-model chat`'s
ChatSession (its own decode loop, streamed and decoded as the REPL does) against plain `model.generate`
on the same prompt and model, as ratios; and whether the loop's greedy tokens equal generate's here.

    python bench/gpu/chat_speed.py [--tokens 128] [--repeat 3] [--plan] [--result FILE]

baseline TTFT   = generate(max_new_tokens=1) on the pre-tokenized prompt (prefill + first token)
baseline decode = (N - 1) / (time of generate(N) - time of generate(1)), greedy, N tokens forced
chat TTFT       = ChatSession.send: template + tokenize + prefill -> first token in hand
chat decode     = (N - 1) / (last token - first token), same N
Sides alternate, medians of --repeat count. Ratios: base TTFT / chat TTFT and chat tok/s / base tok/s
(higher is better for both; goal >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clock, device_and_dtype, quiet, random_qwen2, shape, tokenizer, write_result  # noqa: E402

QUESTION = ("Why does this pod keep restarting, and how do I fix it?\n\n```\n"
            + "\n".join(f"2024-05-01T10:00:{i:02d} INFO worker-{i % 4} handled request {i}" for i in range(20))
            + "\n2024-05-01T10:00:20 ERROR OOMKilled: container exceeded 512Mi\n```")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plan", action="store_true", help="CPU dry mode: tiny shape, float32")
    ap.add_argument("--result")
    args = ap.parse_args()
    quiet()
    import torch

    from devops_cli.chat import decode
    from devops_cli.chat.session import ChatSession
    from devops_cli.chat.settings import settings_from
    from devops_cli.templates import DEFAULT_SYSTEM

    device, dtype = device_and_dtype(args.plan)
    tokens = 16 if args.plan else args.tokens
    tok = tokenizer()
    t0 = time.perf_counter()
    model = random_qwen2(shape("7b", args.plan), tok, device, dtype)
    built = time.perf_counter() - t0
    session = ChatSession(model, tok, model_name="random-qwen2-7b", settings=settings_from(model.generation_config, {}),
                          system=DEFAULT_SYSTEM, seed=0)  # fmt: skip
    session.settings.update(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    _, ids, _ = session.prepare(QUESTION)
    input_ids = torch.tensor([ids], device=device)
    mask = torch.ones_like(input_ids)

    def generate(n: int):
        t = clock(device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, eos_token_id=session.stop_ids, pad_token_id=tok.pad_token_id)
        return clock(device) - t, out[0, input_ids.shape[1]:].tolist()

    def chat():
        session.clear()
        reply = session.send(QUESTION, lambda *_: None)
        assert reply.completion_tokens == tokens, reply.completion_tokens
        return reply.first_token_seconds, (tokens - 1) / (reply.seconds - reply.first_token_seconds)

    # greedy tokens of the loop itself (what chat decodes with) against generate's, on this device
    ours: list[int] = []
    with torch.inference_mode():
        decode.stream(model, input_ids, {**session.settings}, [], ours.append, lambda: False)
    _, theirs = generate(tokens)
    check = decode.self_check(model, input_ids, session.settings)

    generate(4), chat()  # warm-up
    rows: dict[str, list[float]] = {"base_ttft": [], "base_tps": [], "chat_ttft": [], "chat_tps": []}
    for i in range(args.repeat):
        for side in ("base", "chat") if i % 2 == 0 else ("chat", "base"):
            if side == "base":
                t1, _ = generate(1)
                tn, _ = generate(tokens)
                rows["base_ttft"].append(t1)
                rows["base_tps"].append((tokens - 1) / (tn - t1))
            else:
                ttft, tps = chat()
                rows["chat_ttft"].append(ttft)
                rows["chat_tps"].append(tps)
    r = {k: statistics.median(v) for k, v in rows.items()}
    figures = {"model": "random Qwen2 " + ("7B shape" if not args.plan else "tiny stand-in (plan)"),
               "params": sum(p.numel() for p in model.parameters()), "device": str(device),
               "dtype": str(dtype).removeprefix("torch."), "prompt_tokens": len(ids), "tokens": tokens,
               "repeat": args.repeat, **r, "ttft_ratio": r["base_ttft"] / r["chat_ttft"],
               "decode_ratio": r["chat_tps"] / r["base_tps"], "decoder": session.decoder,
               "greedy_equal_generate": ours == theirs, "self_check": check or "passed", "build_s": built}  # fmt: skip
    lines = [f"chat, {figures['model']}, {figures['dtype']} on {device}, {len(ids)}-token prompt, {tokens} tokens: "
             f"TTFT chat {1000 * r['chat_ttft']:.1f} ms vs generate {1000 * r['base_ttft']:.1f} ms "
             f"(ratio {figures['ttft_ratio']:.2f}); decode chat {r['chat_tps']:.1f} vs generate {r['base_tps']:.1f} "
             f"tokens/s (ratio {figures['decode_ratio']:.2f}); decoder '{session.decoder}', greedy tokens "
             f"{'equal' if ours == theirs else 'DIFFER from'} generate's, self-check {figures['self_check']}"]  # fmt: skip
    write_result(args.result, {"figures": figures, "lines": lines})


if __name__ == "__main__":
    main()
