"""Peak memory of `streaming: true` does not grow with the corpus: the same pt run (tiny model, 1
worker, the same steps) over a generated 2 MB corpus and a generated >= 1 GB corpus, alternating,
in one invocation; prints each run's peak RSS (metrics.json: the worker's whole process) and the
difference. The in-memory path over the 2 MB corpus is the reference row.

    .venv/bin/python bench/stream_memory.py [--gb 1.0] [--steps 40] [--repeat 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def corpus(folder: Path, size: int) -> int:
    """A dataset_dir with one pt corpus of about `size` bytes of jsonl (the bundled documents, numbered)."""
    from kit import bundled_texts

    texts = list(bundled_texts())
    folder.mkdir(parents=True, exist_ok=True)
    written = i = 0
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        while written < size:
            line = json.dumps({"text": f"[{i}] {texts[i % len(texts)]}"}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            i += 1
    (folder / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "corpus.jsonl", "stage": "pt"}}))
    return written


def run(model: Path, data: Path, out: Path, steps: int, streaming: bool) -> dict:
    from train import launch  # bench/train.py: one real `devops-model` launch, its metrics.json

    return launch("pt", "tiny-pt.yaml", out, f"model_name_or_path={model}", f"dataset_dir={data}", "dataset=corpus",
                  f"max_steps={steps}", "overwrite_output_dir=true", *(["streaming=true"] if streaming else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the big corpus in GB (default 1.0)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="work here (the corpora stay) instead of a temporary directory")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="bench-stream-"))
    model = work / "tiny"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "devops_cli", "tiny", str(model), "--overwrite"], cwd=ROOT, check=True,
                       capture_output=True)
    sizes = {"2 MB": 2 * 10**6, f"{a.gb:g} GB": int(a.gb * 10**9)}
    made = {}
    for label, size in sizes.items():
        folder = work / label.replace(" ", "")
        t = time.perf_counter()
        made[label] = corpus(folder, size) if not (folder / "corpus.jsonl").is_file() else (folder / "corpus.jsonl").stat().st_size
        print(f"corpus {label}: {made[label] / 1e6:.1f} MB ({time.perf_counter() - t:.0f} s to write)", flush=True)
    rows = []
    for _ in range(a.repeat):
        for label in sizes:
            m = run(model, work / label.replace(" ", ""), work / "out", a.steps, streaming=True)
            rows.append((f"streaming, {label}", m))
    rows.append(("in memory, 2 MB", run(model, work / "2MB", work / "out", a.steps, streaming=False)))
    small = min(m["peak_rss_bytes"] for label, m in rows if label == "streaming, 2 MB")
    print(f"\n{'run (' + str(a.steps) + ' steps, 1 worker)':<24} {'peak RSS':>9} {'vs stream 2 MB':>15} {'tokens/s':>9} {'wall s':>7}")
    for label, m in rows:
        print(f"{label:<24} {m['peak_rss_bytes'] / 2**20:>7.0f}MB {(m['peak_rss_bytes'] - small) / 2**20:>+13.0f}MB "
              f"{m['train_tokens_per_second']:>9.0f} {m['wall']:>7.1f}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
