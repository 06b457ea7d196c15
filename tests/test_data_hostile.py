"""`data corpus` against hostile input: one line and exit 2 where it cannot proceed, counted skips where
it can; and the pieces (reading rule, encodings, scrubbing, cleaning, dedup) on small inputs."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

DOC = ("# Restarting a deployment\n\nUse `kubectl rollout restart deployment/web -n prod` to restart every pod of "
       "a deployment without downtime. Watch it with `kubectl rollout status`.\n\n```sh\nkubectl rollout restart "
       "deployment/web -n prod\n```\n")


def _corpus(capsys, *args) -> tuple[int, str, str]:
    from devops_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(["data", "corpus", *map(str, args), "--workers", "1"])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err.strip()


def _one_error(code, err, *words):
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_empty_folder_and_only_binaries_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _corpus(capsys, tmp_path / "empty", "--output", tmp_path / "out")
    _one_error(code, err, "no document to read", "empty")
    bins = tmp_path / "bins"
    bins.mkdir()
    (bins / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (bins / "blob").write_bytes(b"\x00\x01\x02" * 100)
    code, _, err = _corpus(capsys, bins, "--output", tmp_path / "out")
    _one_error(code, err, "no document to read", "binary")
    assert not (tmp_path / "out" / "corpus.jsonl").exists()


def test_missing_input_output_is_input_and_bad_flags_are_one_line(tmp_path, capsys):
    _one_error(*_corpus(capsys, tmp_path / "nope", "--output", tmp_path / "out")[::2], "does not exist")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(DOC)
    _one_error(*_corpus(capsys, tmp_path / "docs", "--output", tmp_path / "docs")[::2], "is the input folder")
    _one_error(*_corpus(capsys, tmp_path / "docs", "--output", tmp_path / "o", "--threshold", "1.5")[::2], "--threshold")
    _one_error(*_corpus(capsys, tmp_path / "docs", "--output", tmp_path / "o", "--name", "../x")[::2], "--name")
    (tmp_path / "rules.yaml").write_text("allow: ['(unclosed']\n")
    _one_error(*_corpus(capsys, tmp_path / "docs", "--output", tmp_path / "o", "--secrets-rules",
                        tmp_path / "rules.yaml")[::2], "invalid regex")


def test_hostile_files_are_counted_skips(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text(DOC)
    with open(docs / "huge.txt", "wb") as f:  # a 200 MB single-line file
        chunk = b"a" * (8 * 2**20)
        for _ in range(25):
            f.write(chunk)
    (docs / "bad-utf8.txt").write_bytes(bytes(range(128, 256)) * 40)
    (docs / "bad-utf16.txt").write_bytes(b"\xff\xfe" + "ok".encode("utf-16-le") + b"\x00\xd8\x41")  # lone surrogate
    (docs / "good-utf16.txt").write_bytes(("\ufeff" + DOC.replace("web", "api")).encode("utf-16-le"))
    (docs / "gbk.txt").write_bytes(("运维手册：重启部署。" * 20 + "\n使用 kubectl rollout restart 重启每一个 Pod。").encode("gb18030"))
    (docs / "loop").symlink_to(docs)  # a folder loop
    (docs / "a-link").symlink_to(docs / "b-link")
    (docs / "b-link").symlink_to(docs / "a-link")  # a file loop
    outside = tmp_path / "outside.md"
    outside.write_text(DOC.replace("web", "secret-service"))
    (docs / "escape.md").symlink_to(outside)
    (docs / "same.md").symlink_to(docs / "good.md")
    (docs / ".git").mkdir()
    (docs / ".git" / "config").write_text("[core]\n")
    out = docs / "out"  # an output inside the input folder: not read
    code, stdout, err = _corpus(capsys, docs, "--output", out, "--min-chars", "20")
    assert code == 0, err
    report = json.loads((out / "corpus.report.json").read_text())
    reasons = {k: v["count"] for k, v in report["skipped"].items()}
    assert reasons["larger than 64 MB (--max-file-mb)"] == 1
    assert reasons["not text in UTF-8, UTF-16 or GB18030"] == 1
    assert reasons["invalid UTF-16 (it starts with a byte order mark)"] == 1
    assert reasons["symlink to a folder (not followed)"] == 1 and reasons["broken or looping symlink"] == 2
    assert reasons["symlink out of the input folders (not followed)"] == 1
    assert reasons["already read (the same file by another path)"] == 1 and reasons["hidden"] == 1
    rows = [json.loads(x) for x in (out / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {Path(r["source"]).name for r in rows} == {"good.md", "good-utf16.txt", "gbk.txt"}
    assert "运维手册" in next(r["text"] for r in rows if r["source"].endswith("gbk.txt"))
    assert "files: 3 read" in stdout and "skipped" in stdout
    # again, with --overwrite: its own output is not read (and the result is the same)
    before = (out / "corpus.jsonl").read_bytes()
    code, _, err = _corpus(capsys, docs, "--output", out, "--min-chars", "20", "--overwrite")
    assert code == 0 and (out / "corpus.jsonl").read_bytes() == before
    assert json.loads((out / "corpus.report.json").read_text())["skipped"]["the command's output folder"]["count"] == 1


def test_existing_dataset_entry_is_kept_unless_overwrite(tmp_path, capsys):
    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()
    out.mkdir()
    (docs / "a.md").write_text(DOC)
    (out / "dataset_info.json").write_text(json.dumps({"general": {"file_name": "general.jsonl"},
                                                       "corpus": {"file_name": "theirs.jsonl"}}))
    _one_error(*_corpus(capsys, docs, "--output", out, "--min-chars", "20")[::2], "already defined", "--overwrite")
    code, _, err = _corpus(capsys, docs, "--output", out, "--min-chars", "20", "--overwrite")
    registry = json.loads((out / "dataset_info.json").read_text())
    assert code == 0 and registry["general"] == {"file_name": "general.jsonl"}
    assert registry["corpus"]["file_name"] == "corpus.jsonl" and registry["corpus"]["stage"] == "pt"


def test_ctrl_c_leaves_no_output_that_looks_complete(tmp_path):
    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()
    for i in range(400):  # enough work to be interrupted in the middle
        (docs / f"page-{i:03d}.md").write_text(f"# Page {i}\n\n" + DOC * 30 + f"\nrunbook number {i} " * 50)
    proc = subprocess.Popen([sys.executable, "-m", "devops_cli", "data", "corpus", str(docs), "--output", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list(out.glob(".corpus.work-*/spool.jsonl")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == []  # no corpus, report, entry, or work files


def test_read_formats_and_rules(tmp_path):
    from devops_cli.data import clean, dedup, read, secrets

    html = tmp_path / "page.html"
    html.write_text("<html><head><title>Deploy</title></head><body><nav>Home | Docs | Blog</nav><h1>Deploy</h1>"
                    "<p>Run   the   job:</p><pre>make deploy\n    ENV=prod</pre><table><tr><td>a</td><td>b</td></tr></table>"
                    "<footer>© ACME</footer></body></html>")
    doc = read.read_file(html)
    assert doc.title == "Deploy" and doc.text.startswith("# Deploy") and "```\nmake deploy\n    ENV=prod\n```" in doc.text
    assert "Home | Docs" not in doc.text and "© ACME" not in doc.text and "a | b" in doc.text
    assert [s[1] for s in doc.sections] == ["Deploy"]
    rst = "Title\n=====\n\nSection\n-------\n\ntext\n"
    assert [(lv, t) for lv, t, _ in read.headings(rst)] == [(1, "Title"), (2, "Section")]
    with gzip.open(tmp_path / "notes.md.gz", "wt") as f:
        f.write("# Notes\n\nbody\n")
    assert read.read_file(tmp_path / "notes.md.gz").format == "markdown"
    # cleaning keeps code as written, fixes mojibake, drops boilerplate lines only outside code
    text, _ = clean.clean("caf\u00c3\u00a9 menu\u200b\n\n\n\n```\nif  x:\n\n\n    y\n```\n")
    assert text.startswith("café menu\n\n```\nif  x:\n\n\n    y\n```")
    kept, dropped = clean.drop_lines("Edit this page\nreal text\n```\nEdit this page\n```", clean.line_keys("Edit this page"))
    assert dropped == ["Edit this page"] and kept == "real text\n```\nEdit this page\n```"
    # the scrubber: typed placeholders, counts, allow-list, user rules
    out, counts = secrets.scrub("key AKIAIOSFODNN7EXAMPLE mail a.b@corp.io doc user@example.com")
    assert out == "key <SECRET:aws_access_key> mail <SECRET:email> doc user@example.com"
    assert counts == {"aws_access_key": 1, "email": 1}
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("allow: ['@corp\\.io$']\nrules:\n  internal_host: '\\bdb\\d+\\.prod\\.acme\\b'\n")
    out, counts = secrets.scrub("a.b@corp.io on db07.prod.acme", secrets.load_rules(str(rules_file)))
    assert out == "a.b@corp.io on <SECRET:internal_host>" and counts == {"internal_host": 1}
    out, _ = secrets.scrub("ssh 10.2.3.4 and 8.8.8.8", secrets.load_rules(None, True))
    assert "10.2.3.4" not in out and "8.8.8.8" not in out
    # near duplicates: a page and its slightly edited copy are one; English and Chinese pages are two
    page = " ".join(f"step {i}: restart the service and check the logs for errors" for i in range(60))
    edited = page.replace("step 7:", "stage 7:")
    near = dedup.NearDuplicates(0.8)
    assert near.add("a", dedup.signature(page)) is None and near.add("b", dedup.signature(edited)) == "a"
    assert near.add("zh", dedup.signature("第一步：重启服务并检查日志中的错误。" * 30)) is None
    assert dedup.exact_key("a  b\nc") == dedup.exact_key("a b c")
