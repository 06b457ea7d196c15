"""data corpus throughput, and its near-duplicate step against datatrove's MinHash dedup, same corpus, same run.

    python bench/data.py [--size-mb 50] [--workers 2] [--keep DIR]

The corpus: Debian's documentation (postgresql-doc-15 HTML, docker-doc Markdown, debian-reference HTML; `make
docs-corpus` installs them), read once into text, then repeated with perturbations until it reaches --size-mb:
every round after the first changes one word in 20 of each document (a different document, Jaccard well below
0.8), and for 1 document in 10 of every round a near-duplicate is planted (one word in 150 changed, a sentence
added; Jaccard ~0.9). Both dedups see the same JSONL and report the share of planted near-duplicates they remove.

Printed: documents/s and MB/s of the whole `data corpus` (Markdown files in, jsonl out, peak RSS of the parent
and of the largest worker), of our dedup step alone (MinHash in worker processes, LSH in the parent), and of
datatrove's 4-stage MinhashDedup (signatures, buckets, clusters, filter; LocalPipelineExecutor with the same
number of workers, word tokenizer = ours, so both compare the same shingles); ratios against datatrove.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SOURCES = [Path("/usr/share/doc/postgresql-doc-15/html"), Path("/usr/share/doc/docker-doc"), Path("/usr/share/debian-reference")]
WORD = re.compile(r"\b[a-z]{4,}\b")


def _edit(text: str, rng: random.Random, every: int) -> str:
    words = list(WORD.finditer(text))
    for m in sorted(rng.sample(words, max(1, len(words) // every)) if words else [], key=lambda m: -m.start()):
        text = text[: m.start()] + m.group()[::-1] + text[m.end() :]
    return text


def build(folder: Path, size_mb: float, seed: int = 0) -> tuple[list[dict], set[str]]:
    """-> (records {id, text}, ids of the planted near-duplicates); also writes folder/<id>.md for each."""
    from devops_cli.data.clean import clean
    from devops_cli.data.read import read_documents

    base = [clean(d.text)[0] for d in read_documents([s for s in SOURCES if s.exists()])]
    base = [t for t in base if len(t) > 2000]
    if not base:
        raise SystemExit("no Debian docs: run `make docs-corpus` (apt-get install postgresql-doc-15 docker-doc ...)")
    rng = random.Random(seed)
    records, planted, size, round_ = [], set(), 0, 0
    folder.mkdir(parents=True)
    while size < size_mb * 1e6:
        for i, text in enumerate(base):
            doc = text if round_ == 0 else _edit(text, rng, 20)
            items = [(f"r{round_}-d{i}", doc)]
            if rng.random() < 0.1:
                items.append((f"r{round_}-d{i}-near", _edit(doc, rng, 150) + "\nReviewed by the platform team.\n"))
                planted.add(items[-1][0])
            for key, body in items:
                records.append({"id": key, "text": body})
                (folder / f"{key}.md").write_text(body, encoding="utf-8")
                size += len(body.encode("utf-8"))
            if size >= size_mb * 1e6:
                break
        round_ += 1
    return records, planted


def ours_dedup(records: list[dict], workers: int) -> tuple[float, set[str]]:
    """Our dedup step alone: exact key + MinHash in worker processes, LSH in this one. -> (seconds, removed ids)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from devops_cli.data import corpus, dedup

    started = time.perf_counter()
    near, exact, removed = dedup.NearDuplicates(0.8), set(), set()
    chunks = [[{**r, "source": r["id"], "title": ""} for r in records[i : i + 64]] for i in range(0, len(records), 64)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for results in corpus._ordered(pool, corpus.dedup_task, ((c, frozenset(), 0) for c in chunks), 2 * workers):
            for r in results:
                if r["key"] in exact or near.add(r["source"], r["sig"]) is not None:
                    removed.add(r["source"])
                exact.add(r["key"])
    return time.perf_counter() - started, removed


def datatrove_dedup(records: list[dict], workers: int, work: Path) -> tuple[float, set[str]]:
    """datatrove's MinhashDedup (its defaults: 5-grams, 14 buckets x 8 hashes; sha1 hashes), 4 stages.
    -> (seconds, removed ids)."""
    from bench_data_words import OurWords
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    shards = work / "in"
    shards.mkdir(parents=True)
    for k in range(workers):  # one input file per task
        with open(shards / f"part{k}.jsonl", "w", encoding="utf-8") as f:
            for r in records[k::workers]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    # its default hash (xxhash) passes str to xxhash, which xxhash 4 refuses: its other one, sha1
    from datatrove.utils.hashing import HashConfig

    config = MinhashConfig(hash_config=HashConfig(hash_fc="sha1"))
    read = lambda: JsonlReader(str(shards), id_key="id")  # noqa: E731
    started = time.perf_counter()
    stages = [
        [read(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=config, language=OurWords())],
        [MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=config)],
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove_ids"), config=config)],
        [read(), MinhashDedupFilter(input_folder=str(work / "remove_ids"), exclusion_writer=JsonlWriter(str(work / "removed"))),
         JsonlWriter(str(work / "kept"))],
    ]  # fmt: skip
    tasks = [workers, config.num_buckets, 1, workers]
    for i, (pipeline, n) in enumerate(zip(stages, tasks)):
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=min(workers, n), logging_dir=str(work / f"logs{i}"),
                              skip_completed=False).run()
    seconds = time.perf_counter() - started
    import gzip

    removed = set()
    for f in (work / "removed").glob("*"):
        with (gzip.open(f, "rt") if f.suffix == ".gz" else open(f)) as fh:
            removed |= {json.loads(line)["id"] for line in fh}
    return seconds, removed


def whole_pipeline(folder: Path, out: Path, workers: int) -> tuple[float, dict, int, int]:
    """-> (seconds, report, peak RSS of the largest process of the command's tree, exit code). The peak is
    each process's own high-water mark (VmHWM), read every 0.2 s while it lives: not RUSAGE_CHILDREN,
    whose maxrss for a child started by fork/vfork + exec begins at this process's own size (this bench
    holds the whole corpus in memory: 1.9 GB at 1 GB, once misread as the command's)."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "devops_cli", "data", "corpus", str(folder), "--output", str(out),
                             "--name", "bench", "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    peaks: dict[int, int] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                hwm = next((int(line.split()[1]) for line in open(f"/proc/{p.pid}/status") if line.startswith("VmHWM:")), 0)
                peaks[p.pid] = max(peaks.get(p.pid, 0), hwm * 1024)
        except (psutil.Error, OSError):
            pass  # a worker ended between the listing and the read
        time.sleep(0.2)
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(stderr[-2000:])
    report = json.loads((out / "bench.report.json").read_text())
    return seconds, report, max(peaks.values(), default=0), proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp folder)")
    ap.add_argument("--whole-only", action="store_true", help="only the whole `data corpus` run and its peak RSS "
                    "(the 1 GB run: --size-mb 1024 --whole-only)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-data-"))
    (work / "bench_data_words.py").parent.mkdir(parents=True, exist_ok=True)
    # datatrove pickles its pipeline to the workers: the word tokenizer must be importable there
    (work / "bench_data_words.py").write_text(
        "from datatrove.utils.word_tokenizers import WordTokenizer\n"
        "from devops_cli.data.dedup import WORDS\n\n\n"
        "class OurWords(WordTokenizer):\n"
        "    def word_tokenize(self, text):\n        return WORDS.findall(text)\n\n"
        "    def sent_tokenize(self, text):\n        return text.split('\\n')\n\n"
        "    def span_tokenize(self, text):\n        return [m.span() for m in WORDS.finditer(text)]\n")
    sys.path.insert(0, str(work))
    import os

    os.environ["PYTHONPATH"] = os.pathsep.join([str(work), str(ROOT), os.environ.get("PYTHONPATH", "")])
    try:
        t = time.perf_counter()
        records, planted = build(work / "docs", args.size_mb)
        mb = sum(len(r["text"].encode("utf-8")) for r in records) / 1e6
        print(f"corpus: {len(records)} documents, {mb:.1f} MB, {len(planted)} planted near-duplicates "
              f"(built in {time.perf_counter() - t:.0f} s)")
        # the whole command first: RUSAGE_CHILDREN then holds its largest process alone
        s, report, peak_child, _ = whole_pipeline(work / "docs", work / "out", args.workers)
        print(f"whole `data corpus`: {s:.1f} s, {len(records) / s:.1f} docs/s, {mb / s:.2f} MB/s; kept "
              f"{report['documents']}, removed {report['near_duplicates']} near + {report['exact_duplicates']} exact; "
              f"peak RSS of its largest process {peak_child / 2**20:.0f} MB")
        if args.whole_only:
            return
        ours_s, ours_removed = ours_dedup(records, args.workers)
        ref_s, ref_removed = datatrove_dedup(records, args.workers, work / "datatrove")
        pairs = {p: p.removesuffix("-near") for p in planted}

        def recall(removed):  # a planted pair is found when one of its two documents is removed
            return sum(1 for c, o in pairs.items() if (c in removed) != (o in removed)) / len(pairs)

        def other(removed):  # removed documents that belong to no planted pair
            return len(removed - set(pairs) - set(pairs.values()))

        rows = [("ours (datasketch LSH)", ours_s, ours_removed), ("datatrove MinhashDedup", ref_s, ref_removed)]
        print(f"{'dedup step':<24} {'s':>8} {'docs/s':>9} {'MB/s':>7} {'recall':>7} {'other removed':>14}")
        for name, sec, removed in rows:
            print(f"{name:<24} {sec:8.1f} {len(records) / sec:9.1f} {mb / sec:7.2f} {recall(removed):7.1%} {other(removed):14d}")
        print(f"dedup throughput ratio ours/datatrove: {ref_s / ours_s:.2f}x (this bench process peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
