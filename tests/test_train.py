"""Real training: torchrun workers (gloo), LoRA, DeepSpeed ZeRO-3, two nodes, kill -9 and resume.

These launch real processes through the CLI exactly as a user does; each takes seconds to a minute.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, run_main

# the session's kit trains two gloo workers (its pt stage) when the first test asks: under a minute alone,
# several when other training shares the 2 cores (PYTEST="-n 2" runs two test workers)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TINY_PT = str(ROOT / "configs" / "tiny-pt.yaml")
TINY_SFT = str(ROOT / "configs" / "tiny-sft.yaml")


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _load_and_generate(path: Path, adapter: bool = False) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if adapter:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "How do I restart a deployment?"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return tok.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.fixture(scope="module")
def pt_model(kit) -> Path:
    """`devops-model pt configs/tiny-pt.yaml nproc_per_node=2` — two gloo workers (the session kit's pt)."""
    return kit.pt


def test_pt_two_workers_loss_falls_and_checkpoint_loads(pt_model, kit):
    steps = kit.PT_STEPS
    metrics = json.loads((pt_model / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == steps
    assert metrics["data"]["blocks"] > 100 and metrics["train_tokens_per_second"] > 0
    # one DDP job: the token count is gathered over both workers (2 x steps x 8 blocks x 256 tokens)
    assert metrics["train_tokens"] == 2 * steps * 8 * 256
    losses = _losses(pt_model)
    assert losses[-1] < losses[0] - 1.0, losses  # from chance level (ln 4096 = 8.3) down by > 1 nat
    assert metrics["eval_loss"] < losses[0]
    for f in ("recipe.yaml", "training_loss.png", "logs/rank0.log", "logs/rank1.log", "model.safetensors"):
        assert (pt_model / f).is_file(), f
    assert list((pt_model / "runs").rglob("events.out.tfevents.*")), "tensorboard logs"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(pt_model)


@pytest.mark.parametrize("variant", ["full", "zero3"])
def test_sft_variants_load_and_generate(variant, pt_model, tmp_path):
    out = tmp_path / variant
    extra = {"full": [], "zero3": [f"deepspeed={ROOT}/configs/deepspeed/zero3.json"]}
    r = _ok(run_cli("sft", TINY_SFT, f"model_name_or_path={pt_model}", f"output_dir={out}", "max_steps=20",
                    *extra[variant]))
    assert "done" in r.stdout
    losses = _losses(out)
    assert losses[-1] < losses[0], losses
    _load_and_generate(out)


def test_sft_lora_on_the_pt_model_loads_and_export_merges_it(kit):
    """The kit's sft stage (configs/tiny-sft.yaml, LoRA, on the pt model) and its export --adapter."""
    out = kit.sft
    losses = _losses(out)
    assert losses[-1] < losses[0], losses
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(kit.pt)
    _load_and_generate(out, adapter=True)
    _check_merge_equals_adapter(out, kit.merged)


def _check_merge_equals_adapter(adapter: Path, merged: Path):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    a = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()(ids).logits
    b = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(b, base, atol=1e-4), "export must not write the base weights back"


def test_two_nodes_on_one_machine_train_one_job(pt_model, tmp_path):
    from devops_cli.train.launch import free_port

    out = tmp_path / "two-nodes"
    port = free_port()
    common = ["sft", TINY_SFT, f"model_name_or_path={pt_model}", f"output_dir={out}", "nnodes=2",
              "nproc_per_node=1", "master_addr=127.0.0.1", f"master_port={port}", "max_steps=10"]
    env = {**os.environ, "COLUMNS": "200"}
    node0 = subprocess.Popen([sys.executable, "-m", "devops_cli", *common, "node_rank=0"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    node1 = subprocess.Popen([sys.executable, "-m", "devops_cli", *common, "node_rank=1"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    o0, e0 = node0.communicate(timeout=600)
    o1, e1 = node1.communicate(timeout=600)
    assert node0.returncode == 0 and node1.returncode == 0, e0[-2000:] + e1[-2000:]
    assert "2 node(s) [recipe], this is node 0" in o0 and "this is node 1" in o1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 10
    assert (out / "logs" / "rank0.log").is_file() and (out / "logs" / "rank1.log").is_file()


def _worker_pid(root: int, rank: int, timeout: float = 120) -> int:
    """The worker of `rank` among the descendants of `root` (the command this test started): never a
    process of another checkout's run on the same machine."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.Process(root).children(recursive=True):
            try:
                if "devops_cli.train.worker" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                    return p.pid
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} under process {root}")


def _wait_for(path_glob: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if [p for p in path_glob.glob(pattern) if (p / "trainer_state.json").is_file()]:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{pattern} never appeared")


def test_kill_9_of_a_worker_names_the_rank_and_a_rerun_resumes(tiny_model, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "devops_cli", "pt", TINY_PT, f"model_name_or_path={tiny_model}", f"output_dir={out}",
            "nproc_per_node=2", "max_steps=40", "save_steps=10", "eval_steps=1000", "logging_steps=10"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out, "checkpoint-*", proc)
    os.kill(_worker_pid(proc.pid, 1), signal.SIGKILL)
    killed_at = time.time()
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - killed_at < 30
    assert proc.returncode != 0
    assert "rank 1" in stderr and "SIGKILL" in stderr and str(out / "logs" / "rank1.log") in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    r = _ok(subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600))
    assert "resuming from" in r.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 40
    assert json.loads((out / "metrics.json").read_text())["resumed_from"].startswith(str(out / "checkpoint-"))


def test_ctrl_c_stops_every_worker(tiny_model, tmp_path):
    out = tmp_path / "interrupted"
    argv = [sys.executable, "-m", "devops_cli", "pt", TINY_PT, f"model_name_or_path={tiny_model}", f"output_dir={out}",
            "nproc_per_node=2", "max_steps=5000", "save_steps=10"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for(out, "checkpoint-*", proc)
    pids = [_worker_pid(proc.pid, 0), _worker_pid(proc.pid, 1)]
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    time.sleep(1)
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and b"devops_cli.train.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_pt_corpus_smaller_than_one_block_is_one_line(tiny_model, tmp_path):
    r = run_main("pt", TINY_PT, f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'o'}",
                 "max_source_length=10000000", "val_size=0", "eval_steps=null", "force=true")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fewer than one block of max_source_length=10000000" in errors[0], r.stderr[-2000:]
