"""codefuse-devops-eval's own layout: {zh,en}/{dev,test}/<Subject>.csv with `id,question,A,B,C,D,answer,
explanation` and its categroy_mapping.json — files written here from its documented columns (its data is
a zip on the hub; nothing is downloaded)."""

from __future__ import annotations

import csv
import json

import pytest

from devops_cli.eval.exam import discover, load_local

SUBJECTS = {"Logging.csv": ["logging", "日志", 7], "Storage.csv": ["storage", "存储", 6]}


def write_devopseval(root):
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    for split in ("dev", "test"):
        (root / "zh" / split).mkdir(parents=True)
    mapping = {}
    for file, (en, zh, n_test) in SUBJECTS.items():
        mapping[file] = [en, zh, {"dev": 5, "test": n_test}, file]
        for split, n in (("dev", 5), ("test", n_test)):
            with open(root / "zh" / split / file, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                for i in range(n):
                    w.writerow([i, f"{zh}问题{i}：哪个命令查看日志？", "journalctl -u nginx", "ls", "cd /", "pwd",
                                "ABCD"[i % 4], f"解释{i}，含逗号, 与换行\n第二行"])
    (root / "resources").mkdir()
    (root / "resources" / "categroy_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")


def test_the_layout_is_found_with_its_explanation_column_and_chinese_names(tmp_path):
    write_devopseval(tmp_path)
    found = discover(tmp_path / "zh")
    assert {k: v[0] for k, v in found.items()} == {"Logging": "devopseval", "Storage": "devopseval"}
    subjects = load_local(tmp_path / "zh", "all", 5)
    assert [(s.name, s.zh, len(s.dev), len(s.test)) for s in subjects] == [("Logging", "日志", 5, 7), ("Storage", "存储", 5, 6)]
    assert subjects[0].test[2].answer == "C" and subjects[0].test[2].options[0] == "journalctl -u nginx"
    # one folder down works too (the data dir above zh/)
    assert set(discover(tmp_path)) == {"Logging", "Storage"}


@pytest.mark.slow
def test_eval_scores_a_devopseval_folder_at_0_and_5_shots(tmp_path, tiny_model):
    from devops_cli.cli import main

    write_devopseval(tmp_path)
    for shots in (0, 5):
        out = tmp_path / f"r{shots}.json"
        with pytest.raises(SystemExit) as e:
            main(["eval", "--model", str(tiny_model), "--data-dir", str(tmp_path / "zh"), "--subjects", "all",
                  "--shots", str(shots), "--output", str(out)])
        assert e.value.code in (0, None)
        result = json.loads(out.read_text())
        assert {k: v["n"] for k, v in result["subjects"].items()} == {"Logging": 7, "Storage": 6}
        assert result["subjects"]["Logging"]["source"].endswith("zh/test/Logging.csv")
        assert result["overall"]["n"] == 13 and result["shots"] == shots
        assert len(result["questions"]) == 13
