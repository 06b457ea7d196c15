"""Exam CSVs and bad input: each mistake is one line naming file:line or the flag, exit code 2, and no
torch import before the message. Works on copies of the bundled sample exam (and the real one)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import ROOT, SHARED, run_main
from devops_cli.errors import DevopsError
from devops_cli.eval.exam import discover, load_local, read_csv
from kit import BUNDLED_EXAM

DATA = SHARED / "data" / "devops-exam"
needs_data = pytest.mark.skipif(not (DATA / "cmmlu").is_dir(), reason=f"exam data not found at {DATA} (../shared)")


@needs_data
def test_the_real_exam_has_574_questions_and_keeps_cells_as_shipped():
    subjects = load_local(DATA, None, 5)
    assert [(s.name, len(s.test), len(s.dev)) for s in subjects] == [
        ("computer_science", 204, 5), ("computer_security", 171, 5), ("machine_learning", 122, 5),
        ("college_programming", 37, 5), ("computer_architecture", 21, 5), ("computer_network", 19, 5)]  # fmt: skip
    cs = subjects[0]
    assert cs.dev[1].options[0] == "ARP "  # trailing space kept
    assert sum(any(0x2E80 <= ord(c) <= 0x2FDF for c in q.question + "".join(q.options)) for q in cs.test) == 167
    cp = subjects[3]
    assert "\n" in cp.dev[0].question and "\r" not in cp.dev[0].question  # embedded newline, CRLF file
    assert cp.dev[1].where.endswith("college_programming_dev.csv:" + cp.dev[1].where.rsplit(":", 1)[1])


def test_bundled_sample_exam_reads_in_both_layouts():
    found = discover(BUNDLED_EXAM)
    assert {k: v[0] for k, v in found.items()} == {"devops_practice": "cmmlu", "linux_operations": "ceval"}
    subjects = load_local(BUNDLED_EXAM, "all", 5)
    assert [len(s.test) for s in subjects] == [10, 12]
    assert subjects[0].dev[3].where.endswith("linux_operations_dev.csv:6")  # row 2 has an embedded CRLF
    assert all(q.answer in "ABCD" for s in subjects for q in s.test)


@pytest.fixture
def exam(tmp_path) -> Path:
    d = tmp_path / "exam"
    shutil.copytree(BUNDLED_EXAM, d)
    return d


def fails(*args, cwd=ROOT):
    r = run_main("eval", "--model", "no-such-model", *args, cwd=cwd)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_missing_file(exam):
    (exam / "cmmlu" / "dev" / "devops_practice.csv").unlink()
    line = fails("--data-dir", str(exam), "--subjects", "all", "--shots", "5")
    assert "exam file not found" in line and "cmmlu/dev/devops_practice.csv" in line


def test_wrong_header(exam):
    path = exam / "ceval" / "val" / "linux_operations_val.csv"
    path.write_bytes(path.read_bytes().replace(b"id,question,A,B,C,D,answer", b"id,question,A,B,C,answer", 1))
    line = fails("--data-dir", str(exam), "--subjects", "linux_operations")
    assert f"{path}:1: wrong header" in line and "id,question,A,B,C,D,answer" in line


def test_wrong_column_count(exam):
    path = exam / "cmmlu" / "test" / "devops_practice.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[4] = lines[4].replace(",B\n", ",extra,B\n")
    path.write_text("".join(lines), encoding="utf-8")
    line = fails("--data-dir", str(exam), "--subjects", "all")
    assert f"{path}:5: row has 8 columns, the header 7" in line


def test_answer_not_a_to_d(exam):
    path = exam / "ceval" / "dev" / "linux_operations_dev.csv"
    path.write_bytes(path.read_bytes().replace(",B,top 动态".encode(), ",E,top 动态".encode()))
    line = fails("--data-dir", str(exam), "--subjects", "linux_operations", "--shots", "2")
    assert f"{path}:3: answer 'E' is not one of A, B, C, D" in line


def test_unknown_subject(exam):
    line = fails("--data-dir", str(exam), "--subjects", "devops_practise")
    assert "--subjects: no subject 'devops_practise'" in line and "did you mean 'devops_practice'" in line


def test_six_shots(exam):
    line = fails("--data-dir", str(exam), "--subjects", "all", "--shots", "6")
    assert line.startswith("error: --shots: 6 shots is out of range") and "0 to 5" in line


def test_other_flags(exam):
    assert "--protocol: 'mmlu' is not a protocol" in fails("--data-dir", str(exam), "--protocol", "mmlu")
    assert "--batch-size" in fails("--data-dir", str(exam), "--batch-size", "0")
    assert "--data-dir 'nowhere' is not a directory" in fails("--data-dir", "nowhere")
    assert "not in" in fails("--data-dir", str(exam))  # the six DevOps subjects are not in the sample


def test_existing_output_is_kept_unless_overwrite(exam, tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    out.write_text("earlier results")
    line = fails("--data-dir", str(exam), "--subjects", "all", "--output", str(out))
    assert f"--output: '{out}' exists" in line and "--overwrite" in line and out.read_text() == "earlier results"
    # with --overwrite the run goes on (here to the missing model), the file is replaced only by results
    r = run_main("eval", "--model", str(tmp_path / "no-model"), "--data-dir", str(exam), "--subjects", "all",
                "--output", str(out), "--overwrite")
    assert r.returncode == 2 and "no-model" in r.stderr and "exists" not in r.stderr, r.stderr
    assert out.read_text() == "earlier results"
    # the default name never replaces an earlier result: the time is appended
    from devops_cli.eval.run import EvalOptions, output_path

    monkeypatch.chdir(tmp_path)
    o = EvalOptions(model="runs/my-model/", protocol="devops-eval", shots=5)
    assert output_path(o) == Path("runs/eval/my-model-devops-eval-5shot.json")
    output_path(o).parent.mkdir(parents=True)
    output_path(o).write_text("{}")
    again = output_path(o)
    assert again.parent == Path("runs/eval") and again.name.startswith("my-model-devops-eval-5shot-")
    assert output_path(EvalOptions(model="runs/my-model", shots=5, overwrite=True)).name == "my-model-devops-eval-5shot.json"


def test_short_dev_file_against_shots(exam):
    path = exam / "cmmlu" / "dev" / "devops_practice.csv"
    path.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    with pytest.raises(DevopsError, match="--shots 3, but .*devops_practice.csv has 2 exemplar rows"):
        load_local(exam, "devops_practice", 3)
    assert len(read_csv(path, "cmmlu", "dev")) == 2


def test_recipe_errors_name_file_and_line(tmp_path, exam):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: no-such-model\ndata_dir: {exam}\nsubjects: all\nshots: 7\n")
    r = run_main("eval", str(recipe))
    assert r.returncode == 2 and f"{recipe}:4 (shots): 7 shots is out of range" in r.stderr
    recipe.write_text("model: x\nshot: 5\n")
    r = run_main("eval", str(recipe))
    assert r.returncode == 2 and f"{recipe}:2: unknown key 'shot'" in r.stderr and "did you mean 'shots'" in r.stderr
    # a flag overrides the recipe, so the error names the flag
    r = run_main("eval", str(ROOT / "configs" / "eval.yaml"), "--shots", "9")
    assert r.returncode == 2 and "--shots: 9 shots" in r.stderr


def test_shipped_eval_recipe_parses():
    from devops_cli.eval.run import EvalOptions
    from devops_cli.options import read_recipe

    path = ROOT / "configs" / "eval.yaml"
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# devops-model eval configs/eval.yaml")
    values, origin = read_recipe(path, EvalOptions)
    assert values["shots"] == 5 and values["protocol"] == "devops-eval" and origin["shots"].startswith(f"{path}:")
