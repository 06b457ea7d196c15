"""The `data qa` and `data exam` commands (options, then one straight run each; see data/generate.py)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from devops_cli.console import console
from devops_cli.errors import DevopsError

Docs = Annotated[list[Path], typer.Argument(help="documents: folders, files (md/rst/txt/html/pdf) or a corpus JSONL from 'data corpus'")]
Output = Annotated[Path, typer.Option("--output", "-o", help="folder for the results (and the teacher cache that makes reruns resume)")]
Url = Annotated[str, typer.Option("--teacher-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (devops-model serve, vLLM, ollama, a hosted API)")]
Model = Annotated[str | None, typer.Option("--teacher-model", help="model name at the teacher (default: the first it lists)")]
Key = Annotated[str | None, typer.Option("--api-key", help="the teacher's API key (default: $OPENAI_API_KEY)")]
Concurrency = Annotated[int, typer.Option(min=1, max=256, help="requests in flight (keeps a batching server busy)")]
Timeout = Annotated[float, typer.Option(min=1, max=3600, help="seconds per request attempt")]
Attempts = Annotated[int, typer.Option(min=1, max=20, help="tries per request (backoff on 429, 5xx, timeouts)")]
MaxRequests = Annotated[int | None, typer.Option("--max-requests", min=0, help="stop sending after this many requests (cached replies are free)")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="print what would be asked and its size; send nothing")]
Scrub = Annotated[bool, typer.Option("--scrub/--no-scrub", help="replace secrets and personal data before anything is sent (on by default)")]
Rules = Annotated[str | None, typer.Option("--secrets-rules", help="YAML: allow (regexes kept) and rules (kind: regex) added to the scrubber (docs/data.md)")]
Ips = Annotated[bool, typer.Option("--scrub-ips", help="replace IPv4 addresses too (public and private)")]
Lang = Annotated[str, typer.Option(help="prompt language: auto (per chunk), en or zh")]
Prompts = Annotated[Path | None, typer.Option("--prompts", help="folder with your own prompt files (same names as the bundled ones)")]
MaxChars = Annotated[int, typer.Option(min=200, max=100_000, help="largest chunk in characters (code blocks are never cut)")]
MinChars = Annotated[int, typer.Option(min=0, max=100_000, help="smaller sections are joined with the next")]
Grounding = Annotated[float, typer.Option(min=0.0, max=1.0, help="share of an answer's key terms that must occur in its chunk")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace result files not written by devops-model data")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=16, max=32768, help="longest teacher reply, in tokens")]
Tokenizer = Annotated[str | None, typer.Option("--tokenizer", help="count --dry-run tokens with this model's tokenizer")]


def _check_lang(lang: str) -> None:
    if lang not in ("auto", "en", "zh"):
        raise DevopsError(f"--language '{lang}'", "--language", "auto, en or zh")


def qa(
    docs: Docs,
    output: Output,
    teacher_url: Url,
    teacher_model: Model = None,
    api_key: Key = None,
    name: Annotated[str, typer.Option(help="dataset name (NAME.jsonl, the dataset_info.json entry)")] = "doc_qa",
    fmt: Annotated[str, typer.Option("--format", help="alpaca or sharegpt")] = "alpaca",
    chars_per_question: Annotated[int, typer.Option(min=50, max=100_000, help="about one question per this many characters")] = 240,
    max_questions: Annotated[int, typer.Option(min=1, max=50, help="questions per chunk at most")] = 5,
    min_grounding: Grounding = 0.5,
    concurrency: Concurrency = 8,
    timeout: Timeout = 120.0,
    attempts: Attempts = 4,
    max_requests: MaxRequests = None,
    max_tokens: MaxTokens = 1024,
    max_chars: MaxChars = 3000,
    min_chars: MinChars = 300,
    language: Lang = "auto",
    prompts: Prompts = None,
    scrub: Scrub = True,
    secrets_rules: Rules = None,
    scrub_ips: Ips = False,
    dry_run: DryRun = False,
    tokenizer: Tokenizer = None,
    overwrite: Overwrite = False,
) -> None:
    """Grounded question–answer pairs from your documents, written by a teacher LLM → sft data."""
    from devops_cli.data import generate as g
    from devops_cli.data.qa import Settings, Tally, drop_duplicates, fill, load_prompt, pairs_of
    from devops_cli.data.qa import language as lang_of

    if fmt not in ("alpaca", "sharegpt"):
        raise DevopsError(f"--format '{fmt}'", "--format", "alpaca or sharegpt")
    _check_lang(language)
    result, report_path = output / f"{name}.jsonl", output / f"{name}.report.json"
    marker = output / g.CACHE / f"{name}.teacher.jsonl"
    g.guard_output(output, docs, marker, [result, report_path], overwrite)
    report: dict = {"command": "data qa", "name": name}
    chunks = g.chunks_of(docs, output, max_chars, min_chars, scrub, secrets_rules, report, scrub_ips)
    settings = Settings(chars_per_question=chars_per_question, max_questions=max_questions, min_grounding=min_grounding,
                        language=language, prompts_dir=prompts)
    if dry_run:
        c = chunks[0]
        first = fill(load_prompt("qa_questions", lang_of(c.text) if language == "auto" else language, prompts),
                     title=c.title, heading=c.heading or "-", text=c.text, n=max_questions)
        g.dry_run(chunks, first, f"{len(chunks)} for questions + one per question (up to {len(chunks) * max_questions})",
                  tokenizer)
        return
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    teacher = g.make_teacher(output, name, teacher_url, teacher_model, api_key, concurrency, timeout, attempts, max_requests,
                             max_tokens)
    tally = Tally(chunks=len(chunks))

    async def main():
        await teacher.resolve_model()
        return await g.run_all([pairs_of(c, teacher, settings, tally) for c in chunks], len(chunks), "data qa", teacher)

    try:
        per_chunk = asyncio.run(main())
    finally:
        teacher.cache.close()
    rows = drop_duplicates([p for ps in per_chunk for p in ps], "instruction", tally)
    if fmt == "sharegpt":
        rows = [{"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}],
                 "source": r["source"]} for r in rows]
        entry = {"file_name": result.name, "formatting": "sharegpt", "columns": {"messages": "conversations"}}
    else:
        entry = {"file_name": result.name, "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    g.write_atomic(result, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    info = output / "dataset_info.json"
    g.update_dataset_info(info, name, entry)
    report = g.summary(report, teacher, tally, started)
    g.write_atomic(report_path, json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    g.print_summary(report, [result, info, report_path])
    console.print(f"train on it: devops-model sft RECIPE dataset_dir={output} dataset={name}")


def exam(
    docs: Docs,
    output: Output,
    teacher_url: Url,
    teacher_model: Model = None,
    api_key: Key = None,
    subject: Annotated[list[str] | None, typer.Option("--subject", help="NAME=PATH: a subject and its documents (repeatable); default: one subject per input, named after it")] = None,
    chars_per_question: Annotated[int, typer.Option(min=50, max=100_000, help="about one question per this many characters")] = 600,
    max_questions: Annotated[int, typer.Option(min=1, max=20, help="questions per chunk at most")] = 3,
    min_grounding: Grounding = 0.5,
    concurrency: Concurrency = 8,
    timeout: Timeout = 120.0,
    attempts: Attempts = 4,
    max_requests: MaxRequests = None,
    max_tokens: MaxTokens = 1024,
    max_chars: MaxChars = 3000,
    min_chars: MinChars = 300,
    language: Lang = "auto",
    prompts: Prompts = None,
    scrub: Scrub = True,
    secrets_rules: Rules = None,
    scrub_ips: Ips = False,
    dry_run: DryRun = False,
    tokenizer: Tokenizer = None,
    overwrite: Overwrite = False,
) -> None:
    """A multiple-choice exam of your own documents (DevOps-Eval's CSV layout) → devops-model eval --data-dir."""
    from devops_cli.data import generate as g
    from devops_cli.data.exam import DEV, items_of, write_layout
    from devops_cli.data.qa import Settings, Tally, drop_duplicates, fill, load_prompt
    from devops_cli.data.qa import language as lang_of

    _check_lang(language)
    groups = g.subjects(docs, subject)
    inputs = [p for paths in groups.values() for p in paths]
    marker = output / g.CACHE / "exam.teacher.jsonl"
    g.guard_output(output, inputs, marker, [output / "dev", output / "test", output / "categroy_mapping.json"], overwrite)
    report: dict = {"command": "data exam", "subjects": {}}
    chunks = {}
    for name, paths in groups.items():
        part: dict = {}
        chunks[name] = g.chunks_of(paths, output, max_chars, min_chars, scrub, secrets_rules, part, scrub_ips)
        report["subjects"][name] = part
    report.update({k: sum((p[k] for p in report["subjects"].values()), start=0) for k in ("documents", "chunks")})
    report["secrets_redacted"] = g.merge_counts(p["secrets_redacted"] for p in report["subjects"].values())
    settings = Settings(min_grounding=min_grounding, language=language, prompts_dir=prompts)
    topics = {n: "; ".join(dict.fromkeys(c.heading.split(" > ")[-1] for c in cs if c.heading))[:1500] for n, cs in chunks.items()}
    if dry_run:
        name, c = next((n, cs[0]) for n, cs in chunks.items())
        first = fill(load_prompt("exam", lang_of(c.text) if language == "auto" else language, prompts), title=c.title,
                     heading=c.heading or "-", text=c.text, topics=topics[name] or "-", n=max_questions)
        g.dry_run([c for cs in chunks.values() for c in cs], first, f"one per chunk (1-{max_questions} questions each)", tokenizer)
        return
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    teacher = g.make_teacher(output, "exam", teacher_url, teacher_model, api_key, concurrency, timeout, attempts,
                             max_requests, max_tokens)
    tally = Tally(chunks=report["chunks"])
    jobs = [(n, items_of(c, topics[n], teacher, settings, tally, chars_per_question, max_questions))
            for n, cs in chunks.items() for c in cs]

    async def main():
        await teacher.resolve_model()
        return await g.run_all([j for _, j in jobs], len(jobs), "data exam", teacher)

    try:
        items = asyncio.run(main())
    finally:
        teacher.cache.close()
    by_subject: dict[str, list[dict]] = {n: [] for n in chunks}
    for it in drop_duplicates([dict(it, job=i) for i, got in enumerate(items) for it in got], "question", tally):
        by_subject[jobs[it.pop("job")][0]].append(it)
    short = {n: len(v) for n, v in by_subject.items() if len(v) <= DEV}
    report = g.summary(report, teacher, tally, started)
    report["items"] = {n: len(v) for n, v in by_subject.items()}
    g.write_atomic(output / "exam.report.json", json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    g.print_summary(report, [output / "exam.report.json"])
    if short:
        raise DevopsError(f"too few questions kept for subject(s) {', '.join(f'{n} ({k})' for n, k in short.items())}: "
                          f"each needs more than {DEV} (the dev split)", hint="add documents, lower --min-grounding, or "
                          "rerun (finished requests come from the cache)")
    write_layout(output, by_subject)
    console.print(f"[green]exam[/] {sum(map(len, by_subject.values()))} questions in {len(by_subject)} subject(s) → {output}")
    console.print(f"score a model on it: devops-model eval --model MODEL --data-dir {output} --subjects all --shots 5")
