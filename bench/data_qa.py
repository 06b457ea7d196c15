"""Teacher throughput of `devops-model data qa` against our own `serve` (continuous batching) on a tiny
model: aggregate teacher tokens/s at the chosen concurrency vs one request at a time, same documents,
same server, same run (a fresh output folder each, so nothing comes from the cache). Prints the ratio.

    .venv/bin/python bench/data_qa.py [--concurrency 8] [--max-tokens 64] [--docs DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def run(docs: Path, url: str, out: Path, concurrency: int, max_tokens: int) -> dict:
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "devops_cli", "data", "qa", str(docs), "-o", str(out), "--teacher-url", url,
                        "--concurrency", str(concurrency), "--max-tokens", str(max_tokens), "--max-questions", "1",
                        "--min-chars", "200"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"data qa failed:\n{r.stderr}")
    report = json.loads((out / "doc_qa.report.json").read_text())
    report["wall"] = time.monotonic() - started
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--docs", type=Path, default=None, help="documents (default: the bundled sample corpus as Markdown)")
    ap.add_argument("--documents", type=int, default=64, help="bundled documents written (one request each): enough "
                    "that the batch stays full past the first and last waves")
    ap.add_argument("--rounds", type=int, default=2, help="1, N alternations (best of each)")
    args = ap.parse_args()
    from devops_cli.tiny import build, bundled_texts
    from kit import Served

    work = Path(tempfile.mkdtemp(prefix="bench-data-qa-"))
    docs = args.docs
    if docs is None:
        docs = work / "docs"
        docs.mkdir()
        texts = [t for t in bundled_texts() if len(t) > 200][: args.documents]
        for i, t in enumerate(texts):
            (docs / f"doc{i:02d}.md").write_text(f"# Document {i}\n\n{t}\n", encoding="utf-8")
    model = build(work / "tiny")
    server = Served("--model", str(model), "--served-model-name", "tiny", "--max-concurrent", str(max(8, args.concurrency)))
    try:
        rows = []
        for c in (1, args.concurrency) * args.rounds:  # alternated: the machine's noise hits both
            r = run(docs, server.base, work / f"out-{len(rows)}", c, args.max_tokens)
            rows.append((c, r["tokens_out"], r["seconds"], r["requests"]))
            print(f"concurrency {c:3d}: {r['requests']} requests, {r['tokens_out']} tokens out in {r['seconds']:.1f} s "
                  f"= {r['tokens_out'] / r['seconds']:.0f} tok/s")
    finally:
        server.stop()
    best = {c: max(t / s for cc, t, s, _ in rows if cc == c) for c in {1, args.concurrency}}
    print(f"aggregate teacher tokens/s, concurrency {args.concurrency} vs 1 (best of {args.rounds} each): "
          f"{best[args.concurrency]:.0f} / {best[1]:.0f} = {best[args.concurrency] / best[1]:.2f}x")


if __name__ == "__main__":
    main()
