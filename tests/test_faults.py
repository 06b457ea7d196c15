"""Faults of a real training run: kill -9 of the CLI, a second run into a live run's output_dir, a disk
that fills up mid-save, overwrite_output_dir beside a user's own checkpoint folder."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_main

pytestmark = pytest.mark.slow
TINY_PT = str(ROOT / "configs" / "tiny-pt.yaml")


ENV = {**os.environ, "COLUMNS": "400"}


def pt_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["pt", TINY_PT, f"model_name_or_path={model}", f"output_dir={out}", "val_size=0", "eval_steps=null",
            "logging_steps=5", *extra]  # fmt: skip


def pt_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "devops_cli", *pt_args(model, out, *extra)]


def workers_of(out: Path) -> list[int]:
    """pids of live torchrun workers training into `out`."""
    mark = str(out / "recipe.yaml").encode()
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0]
        except OSError:
            continue
        if b"devops_cli.train.worker" in cmd and mark in cmd and state != "Z":
            pids.append(int(pid))
    return pids


def wait_until(check, proc: subprocess.Popen, timeout: float = 300, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_of_the_cli_ends_its_workers_and_a_live_run_holds_output_dir(tiny_model, tmp_path):
    out = tmp_path / "run"
    argv = pt_argv(tiny_model, out, "nproc_per_node=2", "max_steps=2000", "save_steps=20")
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(workers_of(out)) == 2 and list(out.glob("checkpoint-*/trainer_state.json")), proc,
                   what="two workers and a checkpoint")  # fmt: skip
        # a second run into the same output_dir while this one lives: refused, nothing touched
        before = sorted(p.name for p in out.iterdir())
        second = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert f"output_dir '{out}' is in use by a live run (pid {proc.pid} on " in second.stderr
        assert len(workers_of(out)) == 2
        assert set(before) <= {p.name for p in out.iterdir()}
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.time()
        while workers_of(out) and time.time() - killed < 10:
            time.sleep(0.1)
        left = workers_of(out)
        assert not left, f"workers {left} outlived the CLI by 10 s"
        print(f"workers gone {time.time() - killed:.2f} s after kill -9 of the CLI")
    finally:
        proc.kill()
        proc.communicate()
        for pid in workers_of(out):
            os.kill(pid, signal.SIGKILL)
    # the lock died with its holder: a rerun takes output_dir and resumes from the last checkpoint
    done = max(int(p.parent.name[11:]) for p in out.glob("checkpoint-*/trainer_state.json"))
    r = subprocess.run(pt_argv(tiny_model, out, "nproc_per_node=2", f"max_steps={done + 5}", "save_steps=20"),
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {out / f'checkpoint-{done}'}" in r.stdout


def _mount_tmpfs(path: Path, size_mb: int) -> None:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}M", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")


def test_disk_full_mid_save_is_one_line_and_a_rerun_resumes(tiny_model, tmp_path):
    """A tmpfs with room for one checkpoint of the tiny model (weights 3.7 MB + AdamW states 7.4 MB) but
    not two: the second save fails; one line says so with the numbers; with room again, the rerun
    resumes from the complete one."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, 17)
    try:
        out = disk / "run"
        args = pt_args(tiny_model, out, "nproc_per_node=1", "max_steps=20", "save_steps=10", "report_to=none")
        r = run_main(*args)  # one process: the run is this one
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, r.stderr[-3000:]
        assert f"no space left on device at {out}:" in errors[0] and "MB free, the checkpoint needs ~" in errors[0]
        assert "a rerun resumes from checkpoint-10" in errors[0], errors[0]
        print(errors[0])
        subprocess.run(["mount", "-o", "remount,size=200M", str(disk)], check=True)
        r = run_main(*args)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resuming from {out / 'checkpoint-10'}" in r.stdout
        assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 20
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_overwrite_output_dir_removes_only_this_tools_checkpoints(tiny_model, tmp_path):
    out = tmp_path / "run"
    args = pt_args(tiny_model, out, "nproc_per_node=1", "max_steps=4", "save_steps=2", "report_to=none")
    assert run_main(*args).returncode == 0
    mine = out / "checkpoint-7"
    mine.mkdir()
    (mine / "README").write_text("my notes on the run that got us here")
    (mine / "trainer_state.json").write_text("{}")  # looks like a checkpoint, but this run did not make it
    digest = hashlib.sha256((mine / "README").read_bytes()).hexdigest()
    r = run_main(*args, "overwrite_output_dir=true", "seed=7")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "overwrite_output_dir: removed checkpoint-2, checkpoint-4" in r.stdout
    assert "kept checkpoint-7" in r.stderr and "not written by devops-model" in r.stderr
    assert hashlib.sha256((mine / "README").read_bytes()).hexdigest() == digest
