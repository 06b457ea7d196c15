"""chat and eval run straight on a Qwen v1 directory (or hub repo) through modeling's hook: the first
run converts, the second reuses the cache; the v1 remote code never runs."""

from __future__ import annotations

import json
import shutil

import pytest
from test_convert_kit import v1_config, v1_weights, write_v1

from conftest import SHARED, run_cli

pytestmark = pytest.mark.slow  # models loaded in fresh CLI processes
@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory):
    cfg = v1_config("2023-08", seq_length=128)
    return write_v1(tmp_path_factory.mktemp("cmd") / "CodeFuse-DevOps-Model-7B-Chat", cfg, v1_weights(cfg), "bin", 2)


def test_chat_converts_once_then_reuses(v1_dir):
    args = ("chat", "--model", str(v1_dir), "--prompt", "hi", "--max-new-tokens", "4", "--temperature", "0", "--json")
    first = run_cli(*args)  # fresh processes: each run finds the conversion on disk, as a user's does
    assert first.returncode == 0, first.stderr
    assert "converting it once to native Qwen2" in first.stderr
    reply = json.loads(first.stdout)  # stdout stays pure JSON: conversion news goes to stderr
    assert reply["completion_tokens"] >= 1
    stamp = (v1_dir.parent / f"{v1_dir.name}-qwen2" / "model-00001-of-00002.safetensors").stat().st_mtime_ns
    second = run_cli(*args, "--trust-remote-code")  # the flag does not bring v1's code back: it is not needed
    assert second.returncode == 0, second.stderr
    assert "using its Qwen2 conversion" in second.stderr and "converting" not in second.stderr
    assert json.loads(second.stdout)["reply"] == reply["reply"]  # greedy: same weights, same answer
    assert (v1_dir.parent / f"{v1_dir.name}-qwen2" / "model-00001-of-00002.safetensors").stat().st_mtime_ns == stamp
    assert not (v1_dir / "REMOTE_CODE_RAN").exists()


def test_eval_runs_on_a_v1_directory(v1_dir, tmp_path):
    exam = SHARED / "data" / "devops-exam"
    if not exam.is_dir():
        pytest.skip(f"needs the exam CSVs in {exam}")
    for run in (1, 2):  # whichever of chat/eval runs first converts; the other reuses
        r = run_cli("eval", "--model", str(v1_dir), "--data-dir", str(exam), "--limit", "5",
                    "--output", str(tmp_path / f"eval{run}.json"))
        assert r.returncode == 0, r.stderr
        assert "converting" not in r.stderr or run == 1
        assert "using its Qwen2 conversion" in r.stderr or run == 1
    result = json.loads((tmp_path / "eval1.json").read_text())
    assert result["overall"]["n"] >= 5
    assert result["overall"] == json.loads((tmp_path / "eval2.json").read_text())["overall"]
    assert not (v1_dir / "REMOTE_CODE_RAN").exists()


def test_hub_repo_id_from_the_cache_converts_offline(v1_dir, tmp_path):
    """`--model codefuse-ai/CodeFuse-DevOps-Model-7B-Chat` with the repo in the hub cache (offline):
    converted into DEVOPS_MODEL_CONVERT_CACHE, never into the hub cache itself."""
    repo = tmp_path / "hub" / "models--codefuse-ai--CodeFuse-DevOps-Model-7B-Chat"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(v1_dir, repo / "snapshots" / sha, symlinks=True)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "DEVOPS_MODEL_CONVERT_CACHE": str(tmp_path / "conv")}
    # a fresh process: huggingface_hub reads HF_HUB_CACHE when it is imported
    r = run_cli("chat", "--model", "codefuse-ai/CodeFuse-DevOps-Model-7B-Chat", "--prompt", "hi", "--max-new-tokens", "2",
                "--json", env=env)
    assert r.returncode == 0, r.stderr
    converted = list((tmp_path / "conv").glob("codefuse-ai--CodeFuse-DevOps-Model-7B-Chat-*-qwen2"))
    assert len(converted) == 1 and (converted[0] / "devops-model-conversion.json").is_file()
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == [sha]
