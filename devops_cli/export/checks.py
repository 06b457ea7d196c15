"""What an exported GGUF must show before it is called done, and the texts it is shown on.

- logits: transformers reloads the GGUF (`from_pretrained(dir, gguf_file=...)`, dequantized) and
  computes exactly what the source computes with its weights rounded to the file's type (f16, bf16,
  q8_0: the same rounding done in place; equal up to float summation order), and the rounding's
  own effect on the logits is stated (the "fp16 noise"); perplexity on held-out text before and
  after, bounded for the quantized types.
- tokenizer: llama.cpp tokenizes a mixed Chinese / English / code / shell text, and a chat rendered
  with the model's template (special tokens parsed), to the ids the HF tokenizer gives.
- greedy: llama.cpp and transformers (on the same GGUF) decode the same tokens for a few prompts
  (required for f16 / bf16; the agreement is stated for quantized types, whose llama.cpp kernels
  also quantize the activations). llama.cpp computes in half precision where transformers computes
  in float32, so at a near tie — transformers' own logit for llama.cpp's token within half precision's
  noise of its top one (`guard.tolerance`) — the two may part; the decodings must agree up to there.
"""

from __future__ import annotations

import math

from devops_cli import guard
from devops_cli.errors import SelfCheckError

MIXED = ("部署失败时先看日志: kubectl logs -n prod deploy/api --since=10m | grep -i error\n"
         "If the pod is in CrashLoopBackOff, run `kubectl describe pod api-7d9f` and check the events.\n"
         "def restart(service: str) -> int:\n    return subprocess.call([\"systemctl\", \"restart\", service])\n"
         "磁盘满了怎么办？df -h /var && du -sh /var/log/* 2>/dev/null | sort -h | tail -5\n"
         "for i in $(seq 1 3); do curl -sf http://127.0.0.1:8080/health && break; sleep 2; done  # 重试三次\n")  # fmt: skip
PROMPT_TEXTS = ["How do I find out why a pod keeps restarting?", "磁盘空间不足时应该怎么排查？",
                "#!/bin/bash\n# back up /etc before an upgrade\ntar czf"]  # fmt: skip
# perplexity bounds per type (relative increase over the source model on the held-out blocks)
MAX_PPL_INCREASE = {"f16": 0.001, "bf16": 0.01, "q8_0": 0.01, "q4_0": 0.15, "q4_k_m": 0.15}


def held_out(tokenizer, blocks: int = 4, length: int = 128) -> list[list[int]]:
    """`blocks` blocks of `length` tokens from the bundled corpus (English and Chinese documents, the
    last ones of each file: the tiny models' tokenizers are trained on all of it, so no text is new to
    any model here; what is measured is the change from the source, not the level)."""
    import json

    from devops_cli.dataset_info import BUNDLED_DIR

    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for name in ("devops_corpus_en.jsonl", "devops_corpus_zh.jsonl"):
        docs = [json.loads(line)["text"] for line in (BUNDLED_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()]
        for doc in reversed(docs):
            ids += tokenizer(doc)["input_ids"] + [sep]
            if len(ids) >= blocks * length:
                break
        if len(ids) >= blocks * length:
            break
    ids = (ids * (1 + blocks * length // max(1, len(ids))))[: blocks * length]
    return [ids[i * length:(i + 1) * length] for i in range(blocks)]


def prompts(tokenizer) -> list[list[int]]:
    """The greedy-decoding prompts: the first as a chat (the model's template), the others as plain text."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT_TEXTS[0]}], tokenize=False,
                                         add_generation_prompt=True) if tokenizer.chat_template else PROMPT_TEXTS[0]  # fmt: skip
    return [tokenizer(t)["input_ids"] for t in [chat, *PROMPT_TEXTS[1:]]]


def chat_text(tokenizer) -> str | None:
    """A three-turn chat with a system prompt rendered by the model's template (special tokens in it),
    then, where the template takes tools, a tool call with thinking and its result (Qwen3's <think>,
    <tool_call>, <tool_response> added tokens in it)."""
    from devops_cli.export.modelfile import TOOL_CHAT, TOOLS, three_turns

    if not tokenizer.chat_template:
        return None
    text = tokenizer.apply_chat_template(three_turns(True), tokenize=False, add_generation_prompt=True)
    try:
        text += tokenizer.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template without tools
        pass
    return text


def stop_ids(tokenizer, generation: dict) -> list[int]:
    eos = generation.get("eos_token_id", tokenizer.eos_token_id)
    ids = eos if isinstance(eos, list) else [eos]
    return sorted({i for i in ids + [tokenizer.eos_token_id] if i is not None})


# ----------------------------------------------------------------------------------------------
# transformers side
# ----------------------------------------------------------------------------------------------
def measure(model, blocks, prompt_ids, stop, new_tokens: int, pad_id) -> dict:
    """Logits of the first block, perplexity over all, greedy continuations of the prompts."""
    import torch

    with torch.no_grad():
        first = model(input_ids=torch.tensor([blocks[0]])).logits[0].float()
        losses = [model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss.float().item() for b in blocks]
        greedy, steps = [], []
        for p in prompt_ids:
            out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad_id,
                                 output_logits=True, return_dict_in_generate=True)  # fmt: skip
            greedy.append(out.sequences[0, len(p):].tolist())
            steps.append(torch.cat(out.logits).float())  # (tokens, vocab): each step's logits
    greedy = [g[: g.index(s) + 1] if (s := next((t for t in g if t in stop), None)) is not None else g for g in greedy]
    return {"logits": first, "nll": losses, "perplexity": math.exp(sum(losses) / len(losses)), "greedy": greedy,
            "step_logits": steps, "layers": guard.depth(model)}


def compare_logits(reloaded, reference, source, quant: str) -> dict:
    """The reload computes what the rounded source computes; the rounding's effect is stated."""
    scale = max(1.0, source.abs().max().item())
    out = {"scale": scale, "max_abs_diff_vs_source": (reloaded - source).abs().max().item()}
    if reference is not None:
        diff = (reloaded - reference).abs().max().item()
        tol = 1e-4 * scale  # same weights, same float32 math: only the summation order may differ
        out.update({"max_abs_diff_vs_rounded_source": diff, "tolerance": tol,
                    "rounding_noise": (reference - source).abs().max().item()})  # fmt: skip
        if not diff <= tol:
            raise SelfCheckError(f"the GGUF reloaded by transformers does not compute what the source computes with its "
                                 f"weights rounded to {quant} (max |logit diff| {diff:.3g} > {tol:.3g}; "
                                 f"{guard.library_versions('transformers', 'gguf')}); nothing was written",
                                 hint="the tested versions are in requirements.lock (make install)")  # fmt: skip
    return out


def greedy_agreement(a: list[list[int]], b: list[list[int]], measured: dict | None = None, half: str = "float16") -> dict:
    """Per prompt: equal, and the first position where the two decodings part. `measured`: a's
    measure() (its step logits): a parting where a's logit for b's token is within `half` precision's
    noise of a's own choice is a near tie (`margin`, `tolerance`); `agree` = every prompt equal or
    parting at a near tie."""
    rows = []
    for i, (x, y) in enumerate(zip(a, b)):
        n = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), None)
        equal = x == y
        row = {"equal": equal, "first_difference": None if equal else (n if n is not None else min(len(x), len(y))),
               "tokens": len(x)}  # fmt: skip
        if not equal and n is not None and measured is not None:
            step = measured["step_logits"][i][n]
            margin, tol = (step[x[n]] - step[y[n]]).item(), guard.tolerance(half, step, measured["layers"])
            row.update({"margin": margin, "tolerance": tol, "near_tie": margin <= tol})
        rows.append(row)
    return {"prompts": rows, "all_equal": all(r["equal"] for r in rows),
            "agree": all(r["equal"] or r.get("near_tie", False) for r in rows)}
