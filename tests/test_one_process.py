"""A one-process run: the worker runs inside the devops-model process (no torchrun, no second
interpreter), keeps its log, exit codes and signals as a torchrun job does, records its start-up
phases, leaves the quantization libraries it does not use unloaded; and a resumed padding-free sft
run continues bit-identically to the run that never stopped."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, run_main

pytestmark = pytest.mark.slow
TINY_PT = str(ROOT / "configs" / "tiny-pt.yaml")
TINY_SFT = str(ROOT / "configs" / "tiny-sft.yaml")


def _tree_commands(root: int) -> list[bytes]:
    """Command lines of every process below `root` (children, theirs, ...). Only this test's own processes:
    other runs on the machine (another checkout's tests) are none of its business."""
    parent, cmdline = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        parent[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state ppid ...
    below, frontier = [], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        below += frontier
    return [cmdline[pid] for pid in below]


def _ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_one_process_trains_in_the_cli_and_stops_on_a_signal(sig, code, tiny_model, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "devops_cli", "pt", TINY_PT, f"model_name_or_path={tiny_model}", f"output_dir={out}",
            "nproc_per_node=1", "max_steps=5000", "save_steps=10", "val_size=0", "eval_steps=null", "report_to=none"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not list(out.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        # the CLI itself trains: no torchrun agent, no worker process among the processes it started
        others = _tree_commands(proc.pid)
        assert not [c for c in others if b"devops_cli.train.worker" in c or b"torch.distributed.run" in c], others
        assert (out / "logs" / "rank0.log").is_file()
        os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr[-2000:]
    assert f"stopped by {sig.name}" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert "# python -m devops_cli.train.worker" in (out / "recipe.yaml").read_text()
    # the next run resumes from the checkpoint the stopped one left
    done = max(int(p.parent.name[11:]) for p in out.glob("checkpoint-*/trainer_state.json"))
    r = _ok(run_main("pt", TINY_PT, f"model_name_or_path={tiny_model}", f"output_dir={out}", "nproc_per_node=1",
                     f"max_steps={done + 3}", "save_steps=10", "val_size=0", "eval_steps=null", "report_to=none"))
    assert f"resuming from {out / f'checkpoint-{done}'}" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["global_step"] == done + 3 and m["world_size"] == 1
    assert list(m["startup"]) == ["launch", "imports", "arguments", "data", "model", "trainer"]
    assert all(v >= 0 for v in m["startup"].values()) and m["startup_seconds"] > 0


def test_dry_run_of_one_process_shows_the_worker_command(tiny_model, tmp_path):
    out = tmp_path / "o"
    r = _ok(run_main("pt", TINY_PT, f"model_name_or_path={tiny_model}", f"output_dir={out}", "nproc_per_node=1", "--dry-run"))
    assert r.stdout.strip().splitlines()[-1] == f"python -m devops_cli.train.worker {out / 'recipe.yaml'}"
    assert not out.exists()


def test_unused_quantization_libraries_stay_unloaded(tiny_model, tmp_path):
    import importlib.util

    from devops_cli.train import lean

    installed = [m for m in (*lean.QUANTIZERS, "deepspeed") if importlib.util.find_spec(m) is not None]
    if not installed:
        pytest.skip("no optional library is installed in this venv")
    assert lean.unused(str(tiny_model), None, False) == [*lean.QUANTIZERS, "deepspeed"]
    assert lean.unused(str(tiny_model), None, True) == list(lean.QUANTIZERS)  # a DeepSpeed run keeps it
    assert "bitsandbytes" not in lean.unused(str(tiny_model), 4, False)  # QLoRA keeps it
    assert lean.unused("Qwen/Qwen2-7B", None, True) == []  # not a local folder: its quantization is unknown
    quantized = tmp_path / "gptq"
    quantized.mkdir()
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    assert lean.unused(str(quantized), None, True) == []
    out = tmp_path / "lora"
    _ok(run_cli("sft", TINY_SFT, f"model_name_or_path={tiny_model}", f"output_dir={out}", "finetuning_type=lora",
                "max_steps=2", "val_size=0", "eval_steps=null", "report_to=none", "plot_loss=false"))
    log = (out / "logs" / "rank0.log").read_text()
    assert f"not loaded (this run does not use them): {', '.join(installed)}" in log
    assert json.loads((out / "metrics.json").read_text())["optional_libraries"] == []


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_resumed_padding_free_sft_continues_bit_identically(tiny_model, tmp_path):
    common = ["nproc_per_node=1", "max_steps=12", "save_steps=6", "logging_steps=1", "val_size=0",
              "eval_steps=null", "report_to=none", "plot_loss=false", "packing=true",
              "finetuning_type=lora", "lora_dropout=0.1", "learning_rate=5e-3"]  # dropout: the RNG state resumes too
    straight = tmp_path / "straight"
    _ok(run_main("sft", TINY_SFT, f"model_name_or_path={tiny_model}", f"output_dir={straight}", *common))
    assert json.loads((straight / "metrics.json").read_text())["packing"] is True
    # a second run that starts from the straight run's step-6 checkpoint (as a run stopped there would)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(straight / "checkpoint-6", stopped / "checkpoint-6")
    resumed = tmp_path / "resumed"
    r = _ok(run_main("sft", TINY_SFT, f"model_name_or_path={tiny_model}", f"output_dir={resumed}", *common,
                    f"resume_from_checkpoint={stopped / 'checkpoint-6'}"))
    assert "resuming from" in r.stdout

    def losses(out: Path) -> dict:
        state = json.loads((out / "trainer_state.json").read_text())
        return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h and h["step"] > 6}

    assert list(losses(resumed)) == list(range(7, 13))
    assert losses(resumed) == losses(straight)  # the same floats, step by step
    assert _digest(resumed) == _digest(straight)  # and the same final weights, bit for bit


def test_the_same_seed_trains_the_same_lora_adapter(tiny_model, tmp_path):
    """LoRA's A matrices are drawn when the adapter is added, before the Trainer seeds: the recipe's
    seed must already hold then, or two runs of one recipe differ (torch seeds itself per process; here
    the three runs share this process, whose RNG moves on between them)."""
    common = ["finetuning_type=lora", "max_steps=2", "val_size=0", "eval_steps=null", "report_to=none",
              "plot_loss=false", "save_steps=100"]  # fmt: skip
    first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "other"
    for out, seed in ((first, 42), (second, 42), (other, 7)):
        _ok(run_main("sft", TINY_SFT, f"model_name_or_path={tiny_model}", f"output_dir={out}", f"seed={seed}", *common))
    assert _digest(first) == _digest(second)
    assert _digest(first) != _digest(other)


def test_use_liger_kernel_passes_through_or_says_why_not(tiny_model, tmp_path):
    """use_liger_kernel is TrainingArguments' own key; where it cannot run, one line before any worker."""
    import importlib.util
    import shutil

    if shutil.which("nvidia-smi") and importlib.util.find_spec("liger_kernel"):
        pytest.skip("liger-kernel runs here: the GPU kit measures it")
    out = tmp_path / "liger"
    r = run_main("sft", TINY_SFT, f"model_name_or_path={tiny_model}", f"output_dir={out}", "use_liger_kernel=true")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    expected = "liger-kernel is not installed" if importlib.util.find_spec("liger_kernel") is None else "Triton GPU kernels"
    assert len(errors) == 1 and "use_liger_kernel is on, but" in errors[0] and expected in errors[0], errors
    assert "override 'use_liger_kernel=true'" in errors[0] and not out.exists()
