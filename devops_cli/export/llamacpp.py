"""The one client of llama.cpp (through llama-cpp-python, built from source by `make install`).

Every call runs in a child process (`python -m devops_cli.export.llamacpp`, JSON in and out): a
GGUF that llama.cpp rejects may abort the process that loads it, and llama.cpp's own logging goes
to the child's stderr, which is shown only when the call fails. Importing this module does not
import llama_cpp or torch.

Jobs (each may name "threads": the parent passes torch's thread count, so both runtimes use the same):
       {"job": "run", "gguf": PATH, "texts": [...], "prompts": [[ids]], "max_new_tokens": N,
        "stop": [ids], "blocks": [[ids]]}  -> {"tokens": [[ids]], "special_tokens": [[ids]],
        "greedy": [[ids]], "nll": [mean NLL per block], "seconds": {...}}
       {"job": "quantize", "src": PATH, "dst": PATH, "ftype": "q4_k_m"} -> {"seconds": s}
       {"job": "speed", "gguf": PATH, "prompt": [ids], "new_tokens": N} -> {"tokens_per_second": ...}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from devops_cli.errors import DevopsError, first_line

FTYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
# where `make install` records why llama-cpp-python did not build (one line), beside the venv's python
BUILD_NOTE = "llama-cpp-python.failed"


def unavailable() -> str | None:
    """None when llama-cpp-python imports here, else one line saying why (the build's own note when
    `make install` left one)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        return None
    note = Path(sys.prefix) / BUILD_NOTE
    if note.is_file() and note.read_text(encoding="utf-8").strip():
        return "llama-cpp-python did not build: " + note.read_text(encoding="utf-8").strip().split("\n", 1)[0]
    return "llama-cpp-python is not installed (make install builds it; see docs/export.md)"


def call(job: dict, timeout: float = 3600) -> dict:
    """Run one job in a child process; its result, or a DevopsError with llama.cpp's last words."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                                    os.environ.get("PYTHONPATH")) if p)}
    try:
        r = subprocess.run([sys.executable, "-m", "devops_cli.export.llamacpp"], input=json.dumps(job),
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise DevopsError(f"llama.cpp did not finish the {job['job']} job within {timeout:.0f} s") from None
    if r.returncode != 0 or not r.stdout.strip():
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        raise DevopsError(f"llama.cpp failed on {Path(job.get('gguf') or job.get('src')).name} "
                          f"(exit {r.returncode}): {why.strip()[:300]}")  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The child
# ----------------------------------------------------------------------------------------------
def _load(path: str, n_ctx: int, threads: int | None):
    from llama_cpp import Llama

    threads = threads or max(1, os.cpu_count() or 1)
    return Llama(model_path=path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, verbose=False,
                 n_threads=threads, n_threads_batch=threads, seed=0)  # fmt: skip


def _greedy(llm, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in stop:
            break
        llm.eval([token])
    return out


def _nll(llm, block: list[int]) -> float:
    """Mean next-token negative log-likelihood over one block (as transformers' loss computes it)."""
    import numpy as np

    llm.reset()
    llm.eval(block)
    logits = np.asarray(llm.scores[: len(block) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(block) - 1), block[1:]].mean())


def _run(job: dict) -> dict:
    t0 = time.perf_counter()
    longest = max([len(p) + job.get("max_new_tokens", 0) for p in job.get("prompts", [])] +
                  [len(b) for b in job.get("blocks", [])] + [64])  # fmt: skip
    llm = _load(job["gguf"], n_ctx=longest + 8, threads=job.get("threads"))
    t_load = time.perf_counter() - t0
    tokens = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in job.get("texts", [])]
    special = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in job.get("texts", [])]
    stop = set(job.get("stop", []))
    t1 = time.perf_counter()
    greedy = [_greedy(llm, p, job.get("max_new_tokens", 16), stop) for p in job.get("prompts", [])]
    t2 = time.perf_counter()
    nll = [_nll(llm, b) for b in job.get("blocks", [])]
    return {"tokens": tokens, "special_tokens": special, "greedy": greedy, "nll": nll,
            "seconds": {"load": t_load, "greedy": t2 - t1, "score": time.perf_counter() - t2}}  # fmt: skip


def _speed(job: dict) -> dict:
    """Prompt then `new_tokens` greedy tokens, timed apart (the bench's llama.cpp column)."""
    import numpy as np

    llm = _load(job["gguf"], n_ctx=len(job["prompt"]) + job["new_tokens"] + 8, threads=job.get("threads"))
    llm.eval(job["prompt"][:4])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(job["prompt"])
    t1 = time.perf_counter()
    for _ in range(job["new_tokens"]):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    t2 = time.perf_counter()
    return {"prompt_tokens_per_second": len(job["prompt"]) / (t1 - t0),
            "tokens_per_second": job["new_tokens"] / (t2 - t1), "threads": os.cpu_count()}  # fmt: skip


def _quantize(job: dict) -> dict:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[job["ftype"]])
    params.nthread = job.get("threads") or max(1, os.cpu_count() or 1)
    t0 = time.perf_counter()
    code = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(params))
    if code != 0:
        print(f"error: llama_model_quantize returned {code}", file=sys.stderr)
        sys.exit(1)
    return {"seconds": time.perf_counter() - t0}


def main() -> None:
    job = json.loads(sys.stdin.read())
    out = sys.stdout
    sys.stdout = sys.stderr  # anything llama_cpp prints stays off the JSON line
    try:
        result = {"run": _run, "quantize": _quantize, "speed": _speed}[job["job"]](job)
    except Exception as e:  # the parent reports it in one line
        print(f"error: {type(e).__name__}: {first_line(e)}", file=sys.stderr)
        sys.exit(1)
    out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
