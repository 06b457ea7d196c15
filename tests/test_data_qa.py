"""`data qa` / `data exam`: documents → chunks → scrubbed → a teacher on a real socket → grounded pairs
and an exam. The teacher is a scripted stand-in (tests/teacher_double.py) for the happy path and the
hostile ones, and our own `serve` on a tiny model (noise: everything rejected, nothing crashes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from teacher_double import TeacherDouble

from conftest import ROOT, run_cli, run_main
from devops_cli.data.chunk import chunk_text

AWS = "AKIAIOSFODNN7EXAMPL3"
PASSWORD = "hunter2-Sup3rSecret!"

RUNBOOK = f"""# Nginx runbook

## Reload the configuration

Always test the configuration before you reload nginx. A broken file stops the reload and the old workers keep serving.

```bash
sudo nginx -t && sudo systemctl reload nginx
# the reload keeps existing connections open
```

The reload sends SIGHUP to the master process, which starts new workers with the new configuration.

## Rotate the logs

Logrotate moves access.log every night and sends USR1 to the master process so nginx reopens its log files.
The retention is fourteen days on the edge proxies and thirty days on the internal proxies.

## Credentials

The deploy job reads its key from the vault. Never paste it into a ticket: aws_access_key_id = {AWS}
and the admin console password: {PASSWORD} must stay out of the documentation.
"""

POSTGRES = """# PostgreSQL runbook

## Replication lag

Check the replication lag on the primary with pg_stat_replication. A lag above sixty seconds pages the on-call engineer.

```sql
SELECT client_addr, state, replay_lag FROM pg_stat_replication;
```

## Vacuum

Autovacuum must stay enabled on every production cluster. Run VACUUM ANALYZE manually after a bulk load of more than ten million rows.

## Backups

Base backups run nightly with pg_basebackup to the backup host; WAL archiving keeps seven days of point in time recovery.
Restore drills happen every quarter on the staging cluster, and the restore time is recorded in the drill report.

## Connection limits

Applications connect through pgbouncer in transaction mode; max_connections on the server is three hundred.
A connection storm shows up as many idle in transaction sessions in pg_stat_activity.

## Upgrades

Major upgrades use pg_upgrade with the link mode on a replica first, then a switchover during the maintenance window.
"""


@pytest.fixture
def docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    (d / "nginx").mkdir(parents=True)
    (d / "postgres").mkdir()
    (d / "nginx" / "runbook.md").write_text(RUNBOOK, encoding="utf-8")
    (d / "postgres" / "runbook.md").write_text(POSTGRES, encoding="utf-8")
    return d


@pytest.fixture
def teacher():
    t = TeacherDouble()
    yield t
    t.close()


def cli(*argv: str) -> int:
    from devops_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code or 0


def test_chunks_follow_headings_and_never_cut_code():
    text = "# A\n\nintro " * 1 + "\n\n## B\n\n" + "word " * 200 + "\n\n```bash\n" + "echo x\n" * 300 + "```\n\n## C\n\ntail text here"
    chunks = chunk_text(text, "s", "t", max_chars=800, min_chars=50)
    assert any(c.text.count("```") == 2 and c.text.count("echo x") == 300 for c in chunks)  # the block whole
    assert all(c.text.count("```") % 2 == 0 for c in chunks)
    assert {c.heading for c in chunks} >= {"A > B", "A > C"}


def test_qa_writes_grounded_pairs_scrubs_secrets_and_a_rerun_asks_nothing(docs, teacher, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("data", "qa", str(docs), "--output", str(out), "--teacher-url", teacher.url, "--min-chars", "100") == 0
    rows = [json.loads(line) for line in (out / "doc_qa.jsonl").read_text().splitlines()]
    report = json.loads((out / "doc_qa.report.json").read_text())
    assert len(rows) >= 8 and report["kept"] == len(rows)
    assert report["requests"] == len(teacher.seen) and report["documents"] == 2
    assert report["secrets_redacted"].get("aws_access_key") == 1 and sum(report["secrets_redacted"].values()) >= 2
    sent = json.dumps(teacher.seen)
    assert AWS not in sent and PASSWORD not in sent and "<SECRET:aws_access_key>" in sent  # scrubbed before sending
    for path in out.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert AWS not in text and PASSWORD not in text, path
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["doc_qa"]["file_name"] == "doc_qa.jsonl"
    assert all(r["instruction"] and r["output"] for r in rows)
    printed = capsys.readouterr().out
    assert "kept" in printed and AWS not in printed
    # a rerun of the finished job sends nothing and writes the same pairs
    n = len(teacher.seen)
    before = (out / "doc_qa.jsonl").read_bytes()
    assert cli("data", "qa", str(docs), "--output", str(out), "--teacher-url", teacher.url, "--min-chars", "100") == 0
    assert len(teacher.seen) == n and (out / "doc_qa.jsonl").read_bytes() == before
    assert json.loads((out / "doc_qa.report.json").read_text())["cached"] == n


def test_dry_run_sends_nothing(docs, teacher, tmp_path, capsys):
    assert cli("data", "qa", str(docs), "--output", str(tmp_path / "o"), "--teacher-url", teacher.url, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "chunks" in out and "tokens" in out and not teacher.seen
    assert AWS not in out and not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode,reason", [("invalid_json", "not JSON"), ("ungrounded", "not grounded")])
def test_bad_teacher_replies_are_counted_not_fatal(docs, tmp_path, mode, reason):
    t = TeacherDouble(mode)
    try:
        out = tmp_path / "o"
        assert cli("data", "qa", str(docs), "-o", str(out), "--teacher-url", t.url) == 0
        report = json.loads((out / "doc_qa.report.json").read_text())
        assert report["kept"] == 0 and report["rejected"][reason] > 0
    finally:
        t.close()


def test_retries_on_429_and_html_error_pages(docs, tmp_path):
    flaky = TeacherDouble("flaky")
    try:
        out = tmp_path / "o"
        assert cli("data", "qa", str(docs), "-o", str(out), "--teacher-url", flaky.url, "--concurrency", "1") == 0
        report = json.loads((out / "doc_qa.report.json").read_text())
        assert report["retries"] >= report["kept"] > 0 and report["failed"] == 0
    finally:
        flaky.close()
    html = TeacherDouble("html")
    try:
        out = tmp_path / "h"
        assert cli("data", "qa", str(docs), "-o", str(out), "--teacher-url", html.url, "--attempts", "2") == 0
        report = json.loads((out / "doc_qa.report.json").read_text())
        assert report["kept"] == 0 and report["errors"] == {"HTTP 502": report["requests"]}
        assert report["rejected"]["teacher failed"] == report["chunks"]
    finally:
        html.close()


def one_line_exit_2(capsys, *argv) -> str:
    assert cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_hostile_teachers_and_outputs(docs, tmp_path, capsys):
    t401 = TeacherDouble("401")
    try:
        err = one_line_exit_2(capsys, "data", "qa", str(docs), "-o", str(tmp_path / "a"), "--teacher-url", t401.url,
                              "--teacher-model", "m")
        assert "401" in err and "--api-key" in err
    finally:
        t401.close()
    hang = TeacherDouble("hang")
    try:
        started = time.monotonic()
        assert cli("data", "qa", str(docs), "-o", str(tmp_path / "b"), "--teacher-url", hang.url, "--teacher-model", "m",
                   "--timeout", "1", "--attempts", "1", "--concurrency", "8") == 0
        assert time.monotonic() - started < 30  # bounded: timeout x attempts, in parallel
        report = json.loads((tmp_path / "b" / "doc_qa.report.json").read_text())
        assert report["errors"] == {"timeout": report["requests"]} and report["kept"] == 0
    finally:
        hang.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    err = one_line_exit_2(capsys, "data", "qa", str(empty), "-o", str(tmp_path / "c"), "--teacher-url", "http://127.0.0.1:9/v1")
    assert "no text found" in err
    err = one_line_exit_2(capsys, "data", "qa", str(docs), "-o", str(docs / "out"), "--teacher-url", "http://127.0.0.1:9/v1")
    assert "overlaps the input" in err
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "doc_qa.jsonl").write_text("mine\n")
    err = one_line_exit_2(capsys, "data", "qa", str(docs), "-o", str(theirs), "--teacher-url", "http://127.0.0.1:9/v1")
    assert "not written by devops-model" in err and (theirs / "doc_qa.jsonl").read_text() == "mine\n"


def test_exam_in_devops_eval_layout_reads_back(docs, teacher, tmp_path):
    from devops_cli.eval.exam import load_local

    out = tmp_path / "exam"
    assert cli("data", "exam", str(docs / "nginx"), str(docs / "postgres"), "-o", str(out), "--teacher-url", teacher.url,
               "--min-chars", "0", "--max-chars", "400", "--chars-per-question", "120") == 0
    subjects = load_local(out, "all", 5)
    assert [s.name for s in subjects] == ["nginx", "postgres"]
    for s in subjects:
        assert len(s.dev) == 5 and len(s.test) >= 1 and s.layout == "devopseval"
    letters = [q.answer for s in subjects for q in s.dev + s.test]
    assert len(set(letters)) >= 3  # the right option is not always A
    assert json.loads((out / "categroy_mapping.json").read_text())["nginx.csv"][2]["dev"] == 5


def test_exam_with_too_few_questions_says_so(docs, teacher, tmp_path, capsys):
    err = one_line_exit_2(capsys, "data", "exam", str(docs / "nginx"), "-o", str(tmp_path / "e"), "--teacher-url",
                          teacher.url)
    assert "too few questions" in err and "nginx" in err


@pytest.mark.slow
def test_kill_9_and_rerun_repeat_no_finished_request(docs, tmp_path):
    """kill -9 of the command mid-run, then a rerun: every reply that was cached before the kill is never
    asked again; the rerun completes the job."""
    from devops_cli.data.teacher import Cache

    t = TeacherDouble(delay=0.3)
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "devops_cli", "data", "qa", str(docs), "-o", str(out), "--teacher-url", t.url,
            "--concurrency", "2", "--min-chars", "100"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cache = out / ".cache" / "doc_qa.teacher.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not cache.is_file() or len(cache.read_text().splitlines()) < 4):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = set(Cache(cache).entries)
        assert len(finished) >= 4 and not (out / "doc_qa.jsonl").exists()
        n_before = len(t.seen)
        r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        asked_again = set(t.keys()[n_before:])
        assert not asked_again & finished  # no finished request repeated
        report = json.loads((out / "doc_qa.report.json").read_text())
        assert report["cached"] >= len(finished) and report["kept"] > 0
    finally:
        t.close()


@pytest.mark.slow
def test_against_our_own_serve_on_a_tiny_model_everything_is_counted(docs, tiny_model, tmp_path):
    """A real OpenAI-compatible server (devops-model serve) whose tiny model writes noise: the command
    finishes, every chunk counted as rejected, nothing crashes."""
    from kit import Served

    server = Served("--model", str(tiny_model), "--served-model-name", "tiny")
    try:
        out = tmp_path / "o"
        r = run_cli("data", "qa", str(docs), "-o", str(out), "--teacher-url", server.base, "--max-questions", "1",
                    "--max-tokens", "48", timeout=600)
        assert r.returncode == 0, r.stderr
        report = json.loads((out / "doc_qa.report.json").read_text())
        assert report["requests"] >= report["chunks"] > 0 and report["kept"] == 0
        assert sum(report["rejected"].values()) >= report["chunks"]
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_kept_pairs_train_with_sft_and_the_exam_scores_with_eval(docs, teacher, tiny_model, tmp_path):
    out = tmp_path / "qa"
    assert cli("data", "qa", str(docs), "-o", str(out), "--teacher-url", teacher.url, "--min-chars", "100") == 0
    r = run_main("sft", str(ROOT / "configs" / "tiny-sft.yaml"), f"model_name_or_path={tiny_model}",
                f"output_dir={tmp_path / 'sft'}", f"dataset_dir={out}", "dataset=doc_qa", "max_steps=3",
                "finetuning_type=lora")
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 3 if "train" in metrics else True
    exam = tmp_path / "exam"
    assert cli("data", "exam", str(docs / "nginx"), str(docs / "postgres"), "-o", str(exam), "--teacher-url", teacher.url,
               "--min-chars", "0", "--max-chars", "400", "--chars-per-question", "120") == 0
    assert cli("eval", "--model", str(tiny_model), "--data-dir", str(exam), "--subjects", "all", "--shots", "5",
               "--output", str(tmp_path / "r.json")) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["subjects"]) == {"nginx", "postgres"} and result["overall"]["n"] > 0
