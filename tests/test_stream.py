"""streaming: true — the checks before launch, the same blocks as the in-memory path, and a real
2-worker run over 2 files that resumes after kill -9 from each worker's stream position."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_dpo import _ok, _one_error

from conftest import ROOT, run_main, write_jsonl

TINY_PT = str(ROOT / "configs" / "tiny-pt.yaml")


def test_streaming_without_max_steps_is_one_line(tiny_model, tmp_path):
    r = run_main("pt", TINY_PT, f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'o'}", "streaming=true",
                "max_steps=-1", "val_size=0", "eval_steps=null")
    _one_error(r, "streaming: true needs max_steps")
    assert not (tmp_path / "o").exists()


def test_streaming_refuses_max_samples_a_val_ratio_and_dpo(tiny_model, tmp_path):
    base = ["pt", TINY_PT, f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'o'}", "streaming=true"]
    _one_error(run_main(*base, "max_samples=10", "val_size=0", "eval_steps=null"), "max_samples cannot cut a stream")
    _one_error(run_main(*base, "val_size=0.05"), "val_size is a count taken from the head of the stream")
    r = run_main("dpo", str(ROOT / "configs" / "tiny-dpo.yaml"), f"model_name_or_path={tiny_model}",
                f"output_dir={tmp_path / 'o'}", "streaming=true")
    _one_error(r, "streaming is for pt and sft")


def _two_files(tmp_path: Path, copies: int = 3) -> Path:
    """A dataset_dir whose corpus is a folder of 2 jsonl files (2 shards), the bundled documents x copies."""
    from kit import bundled_texts

    texts = list(bundled_texts()) * copies
    d = tmp_path / "data"
    (d / "corpus").mkdir(parents=True)
    write_jsonl(d / "corpus" / "part-0.jsonl", [{"text": t} for t in texts[: len(texts) // 2]])
    write_jsonl(d / "corpus" / "part-1.jsonl", [{"text": t} for t in texts[len(texts) // 2 :]])
    (d / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "corpus", "stage": "pt"}}))
    return d


def test_streamed_blocks_are_the_in_memory_blocks(tokenizer, tmp_path):
    from devops_cli.train import data
    from devops_cli.train import stream as streams
    from devops_cli.train.recipe import load

    d = _two_files(tmp_path, copies=1)
    registry = json.loads((d / "dataset_info.json").read_text())
    registry.update({f"part{i}": {"file_name": f"corpus/part-{i}.jsonl", "stage": "pt"} for i in (0, 1)})
    (d / "dataset_info.json").write_text(json.dumps(registry))
    common = ["model_name_or_path=x", f"dataset_dir={d}", "output_dir=o", "max_steps=5", "val_size=0"]

    def in_memory(names: str) -> list[list[int]]:
        r = load(None, [*common, f"dataset={names}"], stage="pt")
        blocks, _ = data.pack(data.load_all(r, None), tokenizer, 1024, names=r.datasets)
        return blocks["input_ids"]

    def stream(names: str) -> list[list[int]]:
        r = load(None, [*common, f"dataset={names}", "streaming=true", "buffer_size=1"], stage="pt")
        return [list(map(int, row["input_ids"])) for row in streams.build(r, tokenizer)[0]]

    one = stream("part0")
    assert len(one) > 50 and one == in_memory("part0")  # the same documents + EOS cut into the same blocks, in order
    # over 2 files the stream packs each file on its own (a file's partial tail block is dropped at its end)
    both, whole = stream("corpus"), in_memory("part0,part1")
    assert abs(len(both) - len(whole)) <= 1 and set(map(tuple, one)) <= set(map(tuple, both))


@pytest.mark.slow
def test_two_workers_two_files_resume_after_kill_9_from_the_stream_position(tiny_model, tmp_path):
    d = _two_files(tmp_path)
    out = tmp_path / "stream"
    argv = [sys.executable, "-m", "devops_cli", "pt", TINY_PT, f"model_name_or_path={tiny_model}", f"output_dir={out}",
            f"dataset_dir={d}", "dataset=corpus", "streaming=true", "buffer_size=32", "nproc_per_node=2",
            "max_steps=12", "save_steps=6", "logging_steps=2", "val_size=16", "eval_steps=6"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + 300
    done = [out / "checkpoint-6" / name for name in ("stream_state_rank1.json", "trainer_state.json")]
    while not all(p.is_file() for p in done):  # the Trainer writes trainer_state.json last: a complete checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # the CLI itself: its workers die with it (no orphans)
    proc.communicate(timeout=60)
    log = (out / "logs" / "rank0.log").read_text()
    assert "each of the 2 workers reads its own file(s) (2 shards)" in log
    r = _ok(subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600))
    assert "resuming from" in r.stdout
    log = (out / "logs" / "rank0.log").read_text()
    assert "resumed each worker's stream at its position in checkpoint-" in log, log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 12 and metrics["world_size"] == 2
    resumed = int(metrics["resumed_from"].rsplit("-", 1)[1])
    # blocks per step as the in-memory run: 2 workers x 8 blocks x 256 tokens, for every step after the resume
    assert metrics["train_tokens"] == (12 - resumed) * 2 * 8 * 256
    assert "eval_loss" in metrics
