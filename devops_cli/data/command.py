"""`devops-model data ...`: documents -> training data. `data corpus` builds a pt corpus (data/corpus.py);
`data qa` and `data exam` ask a teacher (data/teach_command.py).
No heavy import at module level: `devops-model --help` stays instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from devops_cli.data.teach_command import exam, qa

data_app = typer.Typer(name="data", help="Documents -> training data: `data corpus` a clean pt corpus, `data qa` grounded "
                       "Q&A for sft and `data exam` an exam of your own, from any OpenAI-compatible teacher.",
                       no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
                       context_settings={"help_option_names": ["-h", "--help"]})


@data_app.command("corpus")
def corpus_command(
    docs: Annotated[list[Path], typer.Argument(help="files and folders of documents: Markdown, reStructuredText, "
                                                    "text, HTML, PDF (also .gz)", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for NAME.jsonl, NAME.report.json and "
                                                                 "dataset_info.json", show_default=False)],
    name: Annotated[str, typer.Option("--name", help="dataset name (file NAME.jsonl, entry NAME)")] = "corpus",
    min_chars: Annotated[int, typer.Option("--min-chars", help="drop documents shorter than this after cleaning")] = 100,
    threshold: Annotated[float, typer.Option("--threshold", help="near duplicates: estimated Jaccard similarity of "
                                                                 "word 5-grams at or above this")] = 0.8,
    boilerplate_share: Annotated[float, typer.Option("--boilerplate-share", help="drop a line (outside code) found in "
                                                                                 "at least this share of documents")] = 0.3,
    boilerplate_min_docs: Annotated[int, typer.Option("--boilerplate-min-docs", help="... and in at least this many")] = 5,
    max_file_mb: Annotated[int, typer.Option("--max-file-mb", help="skip files larger than this (after gunzip)")] = 64,
    secrets_rules: Annotated[Path | None, typer.Option("--secrets-rules", help="YAML: allow (regexes kept) and rules "
                                                                                "(kind: regex) added to the scrubber",
                                                       show_default=False)] = None,
    scrub_ips: Annotated[bool, typer.Option("--scrub-ips", help="replace IPv4 addresses too (public and private)")] = False,
    model: Annotated[str | None, typer.Option("--model", help="count tokens with this model's tokenizer",
                                              show_default=False)] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="processes (default: one per CPU core)",
                                                show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing NAME.jsonl / entry")] = False,
) -> None:
    """Read documents, clean them, scrub secrets, remove duplicates: a pt corpus `pt` trains on."""
    import sys

    from devops_cli.console import console
    from devops_cli.data.corpus import Options, run

    opts = Options(docs=docs, output=output, name=name, min_chars=min_chars, threshold=threshold,
                   boilerplate_share=boilerplate_share, boilerplate_min_docs=boilerplate_min_docs,
                   max_file_mb=max_file_mb, secrets_rules=secrets_rules, scrub_ips=scrub_ips, model=model,
                   workers=workers, overwrite=overwrite, progress=sys.stderr.isatty())
    report = run(opts)
    for line in summary(report):
        console.print(line, soft_wrap=True)


def summary(report) -> list[str]:
    """The report in a few lines (secrets by kind and count only: never a secret)."""
    out = Path(report.output).parent
    lines = [f"[bold]data corpus[/] → {escape(report.output)}  ({report.seconds:.1f} s, {report.workers} workers)",
             f"files: {report.files_read} read, {report.files_skipped} skipped"]
    for reason, entry in sorted(report.skipped.items(), key=lambda kv: -kv[1]["count"]):
        lines.append(f"  skipped {entry['count']}: {escape(reason)} (e.g. {escape(entry['examples'][0])})")
    lines.append(f"documents: {report.documents_read} read → {report.documents} kept; removed: {report.too_short} too short, "
                 f"{report.exact_duplicates} exact duplicates, {report.near_duplicates} near duplicates")
    tokens = f", {report.tokens:,} tokens ({escape(report.tokenizer)})" if report.tokens is not None else \
        " (tokens: pass --model to count them)"
    lines.append(f"characters: {report.characters:,} kept of {report.characters_read:,} read{tokens}")
    lines.append(f"boilerplate: {report.boilerplate.get('lines_removed', 0)} lines removed "
                 f"({report.boilerplate.get('distinct_lines', 0)} distinct lines in ≥ {report.boilerplate.get('min_documents')} "
                 f"documents); {report.long_lines_removed} over-long lines removed")
    found = ", ".join(f"{k} {v}" for k, v in report.secrets.items()) or "none"
    lines.append(f"secrets redacted: {sum(report.secrets.values())} ({escape(found)})")
    lines.append(f"report: {escape(str(out / (report.name + '.report.json')))}; train it: devops-model pt RECIPE "
                 f"dataset_dir={escape(str(out))} dataset={escape(report.name)}")
    return lines


data_app.command("qa")(qa)
data_app.command("exam")(exam)
