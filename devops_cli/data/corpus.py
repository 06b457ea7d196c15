"""`devops-model data corpus`: documents -> a cleaned, secret-scrubbed, deduplicated pt corpus.

    read + clean + scrub (workers, per file) -> spool -> boilerplate lines counted
    -> drop boilerplate + length filter + hashes + MinHash (workers, per chunk) -> exact + near dedup (here)
    -> DIR/NAME.jsonl, DIR/NAME.report.json, the NAME entry of DIR/dataset_info.json

Secrets are scrubbed inside the worker that read the file, before its text reaches the spool, this
process, a log or the output. Workers are processes (spawned: every stage is Python), fed a bounded
number of tasks ahead, so memory does not grow with the corpus: what grows is one 8-byte hash per
line (boilerplate counts), the LSH index and one 512-byte signature per kept document.

Everything is written to temporary names inside DIR and renamed at the end: an interrupted run leaves
no NAME.jsonl that looks complete, and the same inputs give the same NAME.jsonl byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from devops_cli.errors import DevopsError

FILES_PER_TASK = 8
DOCS_PER_TASK = 64
CHUNK_CHARS = 4_000_000


@dataclass
class Options:
    docs: list[Path]
    output: Path
    name: str = "corpus"
    min_chars: int = 100
    threshold: float = 0.8  # near duplicates: estimated Jaccard of word 5-grams
    boilerplate_share: float = 0.3  # a line in at least this share of documents (and boilerplate_min_docs) goes
    boilerplate_min_docs: int = 5
    max_file_mb: int = 64
    secrets_rules: Path | None = None
    scrub_ips: bool = False
    model: str | None = None  # tokenizer that counts tokens
    workers: int | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass
class Report:
    name: str = ""
    output: str = ""
    inputs: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    files_read: int = 0
    files_skipped: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> {"count", "examples"}
    documents_read: int = 0
    too_short: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    documents: int = 0
    characters_read: int = 0
    characters: int = 0
    tokens: int | None = None
    tokenizer: str | None = None
    long_lines_removed: int = 0
    boilerplate: dict = field(default_factory=dict)
    secrets: dict = field(default_factory=dict)
    duplicates: dict = field(default_factory=lambda: {"exact": [], "near": []})
    workers: int = 0
    seconds: float = 0.0
    sha1: str = ""

    def skip(self, source: str, reason: str) -> None:
        self.files_skipped += 1
        entry = self.skipped.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < 5:
            entry["examples"].append(source)


# ----------------------------------------------------------------------------------------------
# Worker stages (module-level: they run in spawned processes)
# ----------------------------------------------------------------------------------------------
_STATE: dict = {}


def _init_worker(rules_path: str | None, ips: bool, max_bytes: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    from devops_cli.data import secrets

    _STATE.update(rules=secrets.load_rules(rules_path, ips), max_bytes=max_bytes)


def read_task(paths: list[str]) -> list[dict]:
    """Read, clean and scrub files: one {source, skip} or {source, title, text, secrets, long, keys} each."""
    import numpy as np

    from devops_cli.data import clean, read, secrets

    out = []
    for path in paths:
        doc = read.read_file(Path(path), _STATE["max_bytes"])
        if isinstance(doc, read.Skip):
            out.append({"source": doc.source, "skip": doc.reason})
            continue
        text, long = clean.clean(doc.text)
        text, found = secrets.scrub(text, _STATE["rules"])
        title, title_found = secrets.scrub(" ".join(doc.title.split()), _STATE["rules"])
        keys = np.fromiter(clean.line_keys(text), dtype=np.uint64)
        out.append({"source": doc.source, "title": title, "text": text, "chars": len(doc.text),
                    "secrets": dict(found + title_found), "long": long, "keys": keys})
    return out


def dedup_task(records: list[dict], boilerplate: frozenset, min_chars: int) -> list[dict]:
    """Boilerplate lines out, then the length filter, the exact key and the MinHash of each record."""
    from devops_cli.data import clean, dedup

    out = []
    for r in records:
        text, dropped = clean.drop_lines(r["text"], boilerplate)
        r = {**r, "text": text, "boilerplate": sorted({" ".join(x.split()) for x in dropped})}
        if len(text.strip()) < min_chars:
            r["short"] = True
        else:
            r["key"] = dedup.exact_key(text)
            r["sig"] = dedup.signature(text)
        out.append(r)
    return out


def _submit(executor, fn, args):
    """executor.submit with Ctrl-C ignored while it may start a worker: a spawned process keeps an
    ignored SIGINT from birth, so the terminal's Ctrl-C (sent to the whole process group) reaches this
    process alone, which cancels the rest and cleans up; a worker still importing would print a traceback."""
    import signal

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return executor.submit(fn, *args)
    finally:
        signal.signal(signal.SIGINT, old)


def _ordered(executor, fn, tasks, ahead: int):
    """executor.map that keeps at most `ahead` tasks in flight (bounded memory), results in order."""
    pending: deque = deque()
    for args in tasks:
        pending.append(_submit(executor, fn, args))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def check(opts: Options) -> Path:
    """Every reason the command cannot start, before any work; -> the dataset_info.json path."""
    import re

    from devops_cli.outputs import writable_or_raise

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", opts.name):
        raise DevopsError(f"name '{opts.name}' is not a plain file name", "--name", "use letters, digits, _ . -")
    if not opts.docs:
        raise DevopsError("no documents named", "DOCS", "name files or folders: devops-model data corpus docs/ --output out")
    out = opts.output
    if out.exists() and not out.is_dir():
        raise DevopsError(f"'{out}' exists and is a file", "--output", "choose a folder")
    resolved = out.resolve()
    for d in opts.docs:
        if d.is_dir() and d.resolve() == resolved:
            raise DevopsError(f"the output folder '{out}' is the input folder '{d}'", "--output",
                              "write the corpus to another folder (one inside the input is fine: it is not read)")
    for path, what in ((out / f"{opts.name}.jsonl", "corpus"), (out / f"{opts.name}.report.json", "report")):
        if path.exists() and not opts.overwrite:
            raise DevopsError(f"the {what} '{path}' exists", "--output", "pass --overwrite to replace it, or choose --name")
    info = out / "dataset_info.json"
    if info.exists():
        try:
            registry = json.loads(info.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DevopsError(f"invalid JSON ({type(e).__name__})", str(info), "fix it or move it away") from None
        if not isinstance(registry, dict):
            raise DevopsError("dataset_info.json must map dataset names to entries", str(info))
        if opts.name in registry and registry[opts.name] != _entry(opts.name, registry[opts.name].get("file_sha1")) \
                and not opts.overwrite:
            raise DevopsError(f"dataset '{opts.name}' is already defined in {info}", "--name",
                              "pass --overwrite to replace the entry, or choose another --name")
    for value, flag, low in ((opts.min_chars, "--min-chars", 0), (opts.max_file_mb, "--max-file-mb", 1),
                             (opts.boilerplate_min_docs, "--boilerplate-min-docs", 1)):
        if value < low:
            raise DevopsError(f"{flag} must be >= {low}, got {value}", flag)
    if not 0 < opts.threshold <= 1:
        raise DevopsError(f"--threshold must be in (0, 1], got {opts.threshold}", "--threshold")
    if opts.workers is not None and opts.workers < 1:
        raise DevopsError(f"--workers must be >= 1, got {opts.workers}", "--workers")
    if opts.secrets_rules is not None:
        from devops_cli.data import secrets

        if not opts.secrets_rules.is_file():
            raise DevopsError(f"'{opts.secrets_rules}' is not a file", "--secrets-rules")
        secrets.load_rules(str(opts.secrets_rules), opts.scrub_ips)  # its errors now, not in a worker
    writable_or_raise(out, "--output")
    return info


def _entry(name: str, sha1: str | None) -> dict:
    return {"file_name": f"{name}.jsonl", "stage": "pt", "columns": {"prompt": "text"},
            **({"file_sha1": sha1} if sha1 else {})}


def _need_extra() -> None:
    import importlib.util

    missing = [m for m in ("resiliparse", "pypdfium2", "ftfy", "datasketch", "detect_secrets", "ahocorasick", "xxhash")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise DevopsError(f"data corpus needs {', '.join(missing)}", hint="pip install 'devops-model[data]'")


def run(opts: Options) -> Report:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from devops_cli.data import dedup, read

    _need_extra()
    info_path = check(opts)
    tokenizer = None
    if opts.model:
        from devops_cli.modeling import load_tokenizer

        tokenizer = load_tokenizer(opts.model)
    started = time.time()
    workers = opts.workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    report = Report(name=opts.name, output=str(opts.output / f"{opts.name}.jsonl"), inputs=[str(d) for d in opts.docs],
                    options={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()
                             if k not in ("docs", "output", "overwrite", "progress")},
                    workers=workers, tokenizer=opts.model)
    opts.output.mkdir(parents=True, exist_ok=True)
    work = opts.output / f".{opts.name}.work-{os.getpid()}"
    work.mkdir()
    progress = _progress(opts.progress)
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                               initargs=(str(opts.secrets_rules) if opts.secrets_rules else None, opts.scrub_ips,
                                         opts.max_file_mb * 2**20))
    try:
        with progress:
            # pass 1: read, clean, scrub -> spool; boilerplate line counts
            spool = work / "spool.jsonl"
            keys: list = []
            secrets = Counter()
            task = progress.add_task("reading", total=None)
            files = (f for f in read.walk(opts.docs, exclude=[opts.output]) if not _skipped(f, report))
            tasks = ((list(map(str, batch)),) for batch in _batches(files, FILES_PER_TASK))
            with open(spool, "w", encoding="utf-8") as f:
                for results in _ordered(pool, read_task, tasks, 4 * workers):
                    for r in results:
                        if "skip" in r:
                            report.skip(r["source"], r["skip"])
                            continue
                        report.files_read += 1
                        report.documents_read += 1
                        report.characters_read += r["chars"]
                        report.long_lines_removed += r["long"]
                        secrets.update(r["secrets"])
                        keys.append(r["keys"])
                        f.write(json.dumps({"text": r["text"], "source": r["source"], "title": r["title"]},
                                           ensure_ascii=False) + "\n")
                    progress.update(task, advance=len(results))
            if not report.documents_read:
                reasons = "; ".join(f"{v['count']} {k}" for k, v in report.skipped.items()) or "the folders are empty"
                raise DevopsError(f"no document to read in {', '.join(map(str, opts.docs))} ({reasons})", "DOCS",
                                  "name folders holding Markdown, reStructuredText, text, HTML or PDF files")
            boilerplate = _boilerplate(keys, report.documents_read, opts)
            del keys
            # pass 2: boilerplate out, length, hashes -> exact and near dedup -> the corpus
            near = dedup.NearDuplicates(opts.threshold)
            exact: dict[bytes, str] = {}
            clusters_exact: dict[str, list] = {}
            clusters_near: dict[str, list] = {}
            task2 = progress.add_task("deduplicating", total=report.documents_read)
            tmp_jsonl = work / f"{opts.name}.jsonl"
            sha1 = hashlib.sha1()
            removed_lines = Counter()
            tokens = 0
            with open(spool, encoding="utf-8") as src, open(tmp_jsonl, "wb") as out:
                chunks = ((batch, boilerplate, opts.min_chars) for batch in _record_chunks(src))
                kept_batch: list[str] = []
                for results in _ordered(pool, dedup_task, chunks, 2 * workers):
                    for r in results:
                        removed_lines.update(r["boilerplate"])
                        if r.get("short"):
                            report.too_short += 1
                            continue
                        if r["key"] in exact:
                            report.exact_duplicates += 1
                            clusters_exact.setdefault(exact[r["key"]], []).append(r["source"])
                            continue
                        exact[r["key"]] = r["source"]
                        twin = near.add(r["source"], r["sig"])
                        if twin is not None:
                            report.near_duplicates += 1
                            clusters_near.setdefault(twin, []).append(
                                {"source": r["source"], "jaccard": round(dedup.jaccard(r["sig"], near.kept[twin]), 3)})
                            continue
                        line = (json.dumps({"text": r["text"], "source": r["source"], "title": r["title"]},
                                           ensure_ascii=False) + "\n").encode("utf-8")
                        out.write(line)
                        sha1.update(line)
                        report.documents += 1
                        report.characters += len(r["text"])
                        if tokenizer is not None:
                            kept_batch.append(r["text"])
                            if len(kept_batch) >= 256:
                                tokens += _count_tokens(tokenizer, kept_batch)
                                kept_batch = []
                    progress.update(task2, advance=len(results))
                if tokenizer is not None and kept_batch:
                    tokens += _count_tokens(tokenizer, kept_batch)
            if not report.documents:
                raise DevopsError(f"no document is left: {report.too_short} shorter than --min-chars {opts.min_chars}, "
                                  f"{report.exact_duplicates + report.near_duplicates} duplicates", "DOCS",
                                  "lower --min-chars, or add documents")
        report.tokens = tokens if tokenizer is not None else None
        report.secrets = dict(sorted(secrets.items()))
        report.boilerplate = {"lines_removed": sum(removed_lines.values()), "distinct_lines": len(boilerplate),
                              "min_documents": _boilerplate_floor(report.documents_read, opts),
                              "most_removed": [{"line": k, "documents": n} for k, n in removed_lines.most_common(10)]}
        report.duplicates = {"exact": [{"kept": k, "removed": v} for k, v in clusters_exact.items()],
                             "near": [{"kept": k, "removed": v} for k, v in clusters_near.items()]}
        report.sha1 = sha1.hexdigest()
        report.seconds = round(time.time() - started, 2)
        _publish(opts, work, tmp_jsonl, report, info_path)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(work, ignore_errors=True)
    return report


def _skipped(found, report: Report) -> bool:
    from devops_cli.data.read import Skip

    if isinstance(found, Skip):
        report.skip(found.source, found.reason)
        return True
    return False


def _record_chunks(src):
    """Spool lines -> lists of records of about CHUNK_CHARS characters (or DOCS_PER_TASK documents)."""
    batch, size = [], 0
    for line in src:
        batch.append(json.loads(line))
        size += len(line)
        if size >= CHUNK_CHARS or len(batch) >= DOCS_PER_TASK:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _boilerplate_floor(documents: int, opts: Options) -> int:
    import math

    return max(opts.boilerplate_min_docs, math.ceil(opts.boilerplate_share * documents))


def _boilerplate(keys: list, documents: int, opts: Options) -> frozenset:
    """The line hashes counted in at least the floor's number of documents."""
    import numpy as np

    if not keys:
        return frozenset()
    values, counts = np.unique(np.concatenate(keys), return_counts=True)
    return frozenset(int(v) for v in values[counts >= _boilerplate_floor(documents, opts)])


def _count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _publish(opts: Options, work: Path, tmp_jsonl: Path, report: Report, info_path: Path) -> None:
    """The corpus, its report and its dataset_info.json entry, each renamed into place from a temp."""
    registry = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    registry[opts.name] = _entry(opts.name, report.sha1)
    tmp_report, tmp_info = work / "report.json", work / "dataset_info.json"
    tmp_report.write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp_info.write_text(json.dumps(registry, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp_jsonl, opts.output / f"{opts.name}.jsonl")
    os.replace(tmp_report, opts.output / f"{opts.name}.report.json")
    os.replace(tmp_info, info_path)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from devops_cli.console import err_console

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True, disable=not enabled)
