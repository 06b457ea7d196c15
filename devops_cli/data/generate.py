"""`devops-model data qa` and `data exam`: documents → chunks → (secrets scrubbed) → a teacher LLM →
grounded Q&A for sft, or a multiple-choice exam for eval.

The run's state lives in the output folder: `.cache/<name>.teacher.jsonl` holds every finished teacher
reply (data/teacher.py), so a crash, kill -9, Ctrl-C or rerun repeats no finished request, and a rerun
of a finished job asks nothing and writes the same files. Result files are written to a temporary name
beside them and renamed into place at the end (nothing half-written looks complete).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path

from devops_cli.console import console
from devops_cli.data.chunk import Chunk, chunk_text
from devops_cli.errors import DevopsError

CACHE = ".cache"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DevopsError(f"cannot write {path}: {e.strerror}", hint="free some disk space or choose another --output") from None


def documents(inputs: list[Path], output: Path, skips: list):
    """(text, source, title) of every document: a corpus JSONL from `data corpus` record by record, any
    other file or folder through the one reading rule (data/read.py)."""
    from devops_cli.data.read import read_documents

    others = []
    for p in inputs:
        if p.is_file() and p.suffix == ".jsonl":
            with open(p, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    try:
                        r = json.loads(line)
                    except ValueError:
                        raise DevopsError("not a JSON line", f"{p}:{n}", "pass a corpus JSONL written by 'data corpus'") from None
                    if isinstance(r, dict) and isinstance(r.get("text"), str):
                        yield r["text"], str(r.get("source") or f"{p}:{n}"), str(r.get("title") or "")
        else:
            others.append(p)
    if others:
        for d in read_documents(others, exclude=[output], skips=skips):
            yield d.text, d.source, d.title


def guard_output(output: Path, inputs: list[Path], marker: Path, results: list[Path], overwrite: bool) -> None:
    """The output is no input and holds no input; results that exist are ours (a cache beside them)."""
    out = output.resolve()
    for p in inputs:
        src = p.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise DevopsError(f"--output '{output}' overlaps the input '{p}'", "--output",
                              "choose a folder outside the documents")
    if output.exists() and not output.is_dir():
        raise DevopsError(f"'{output}' exists and is not a folder", "--output", "choose a folder")
    theirs = [r for r in results if r.exists()]
    if theirs and not marker.is_file() and not overwrite:
        raise DevopsError(f"'{theirs[0]}' exists and was not written by devops-model data", "--output",
                          "choose another --output or pass --overwrite")


def chunks_of(inputs: list[Path], output: Path, max_chars: int, min_chars: int, scrub: bool, rules_file: str | None,
              report: dict, ips: bool = False) -> list[Chunk]:
    """Chunks of every document, secrets scrubbed (counted per kind) before anything leaves the machine."""
    skips: list = []
    chunks: list[Chunk] = []
    secrets: Counter = Counter()
    rules = None
    if scrub:
        from devops_cli.data.secrets import load_rules
        from devops_cli.data.secrets import scrub as scrub_text

        rules = load_rules(rules_file, ips)
    n_docs = 0
    for text, source, title in documents(inputs, output, skips):
        n_docs += 1
        if rules is not None:
            text, found = scrub_text(text, rules)
            secrets.update(found)
        chunks += chunk_text(text, source, title, max_chars, min_chars)
    report.update(documents=n_docs, skipped=Counter(s.reason.split(" (")[0] for s in skips),
                  secrets_redacted=dict(secrets), scrubbed=scrub, chunks=len(chunks))
    if not chunks:
        raise DevopsError(f"no text found in {', '.join(map(str, inputs))}"
                          + (f" ({len(skips)} file(s) skipped)" if skips else ""),
                          hint="pass folders or files of Markdown, text, HTML or PDF documents")
    return chunks


async def run_all(jobs, total: int, label: str, teacher) -> list:
    """Runs the jobs (coroutines), a progress bar with an ETA over them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)

        async def one(job):
            result = await job
            bar.advance(task)
            return result

        try:
            return await asyncio.gather(*(one(j) for j in jobs))
        finally:
            await teacher.close()


def make_teacher(output: Path, name: str, url: str, model: str | None, api_key: str | None, concurrency: int,
                 timeout: float, attempts: int, max_requests: int | None, max_tokens: int = 1024):
    from devops_cli.data.teacher import Cache, Teacher

    cache = Cache(output / CACHE / f"{name}.teacher.jsonl")
    return Teacher(url, model, api_key or os.environ.get("OPENAI_API_KEY"), cache, concurrency=concurrency,
                   timeout=timeout, attempts=attempts, max_requests=max_requests, params={"max_tokens": max_tokens})


def summary(report: dict, teacher, tally, started: float) -> dict:
    report.update(teacher=teacher.url, teacher_model=teacher.model, requests=teacher.stats.requests,
                  cached=teacher.stats.cached, retries=teacher.stats.retries, failed=teacher.stats.failed,
                  errors=teacher.stats.errors, tokens_in=teacher.stats.tokens_in, tokens_out=teacher.stats.tokens_out,
                  questions=tally.questions, kept=tally.kept, rejected=tally.rejected,
                  seconds=round(time.monotonic() - started, 1))
    return report


def print_summary(report: dict, wrote: list[Path]) -> None:
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(report["rejected"].items())) or "none"
    secrets = sum(report["secrets_redacted"].values())
    console.print(f"{report['documents']} documents → {report['chunks']} chunks · {report['requests']} requests "
                  f"({report['cached']} cached, {report['retries']} retries, {report['failed']} failed) · "
                  f"tokens in/out {report['tokens_in']}/{report['tokens_out']} · secrets redacted {secrets}")
    console.print(f"kept {report['kept']} of {report['questions']} · rejected: {rejected}")
    for p in wrote:
        console.print(f"[green]wrote[/] {p}")


def dry_run(chunks: list[Chunk], first_prompt: str, per_chunk_requests: str, tokenizer: str | None) -> None:
    n_chars = sum(len(c.text) for c in chunks)
    if tokenizer:
        from devops_cli.modeling import load_tokenizer

        tok = load_tokenizer(tokenizer)
        count = f"{sum(len(tok(c.text)['input_ids']) for c in chunks):,} tokens of chunk text ({tokenizer})"
    else:
        count = f"≈{n_chars // 3:,} tokens of chunk text (≈3 characters a token; --tokenizer MODEL counts exactly)"
    console.print(first_prompt, markup=False, highlight=False)
    console.print(f"[bold]dry run[/]: {len(chunks)} chunks, {n_chars:,} characters, {count}; "
                  f"requests: {per_chunk_requests}; nothing was sent")


def update_dataset_info(path: Path, name: str, entry: dict) -> None:
    """Adds or replaces one entry of a dataset_info.json, keeping the others."""
    info = {}
    if path.is_file():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise DevopsError("not valid JSON", str(path), "fix it, or choose another --output") from None
        if not isinstance(info, dict):
            raise DevopsError("not a JSON object of datasets", str(path), "choose another --output")
    info[name] = entry
    write_atomic(path, json.dumps(info, ensure_ascii=False, indent=2) + "\n")


def subjects(docs: list[Path], named: list[str] | None) -> dict[str, list[Path]]:
    """--subject NAME=PATH (repeatable) or one subject per input, named after its file or folder."""
    import re

    out: dict[str, list[Path]] = {}
    for spec in named or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise DevopsError(f"--subject '{spec}'", "--subject", "write NAME=PATH, e.g. --subject Logging=docs/logging")
        if not re.fullmatch(r"[\w\-. ]+", name.strip()):
            raise DevopsError(f"--subject name '{name}' is not usable as a file name", "--subject", "use letters, digits, - _ .")
        out.setdefault(name.strip(), []).append(Path(path))
    for p in docs if not named else []:
        out.setdefault(re.sub(r"[^\w\-.]+", "_", p.stem) or "docs", []).append(p)
    if not out:
        raise DevopsError("no documents given", hint="pass folders or files, or --subject NAME=PATH")
    return out


def merge_counts(counts) -> dict:
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    return dict(total)
