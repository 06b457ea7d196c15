"""A command's life and death (devops_cli/lifeline.py): kill -9 leaves no child process (the datasets
tokenizer pool of preprocessing_num_workers, torchrun workers); SIGTERM and Ctrl-C end it with 143 / 130
and one line at any phase (tokenizing, waiting for the other nodes, quantizing, converting); what a
killed run left behind is removed by the next one."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

TINY_PT = str(ROOT / "configs" / "tiny-pt.yaml")
ENV = {**os.environ, "COLUMNS": "400"}


# --- helpers -------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == pid and stat[0] != "Z":
            out.append(int(p))
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class Watched:
    """A devops-model process, every process it ever had below it, and its output."""

    def __init__(self, *args: str, env: dict | None = None):
        self.out = Path(f"/tmp/lifeline-{os.getpid()}-{time.time_ns()}.out")
        self.proc = subprocess.Popen([sys.executable, "-m", "devops_cli", *args], cwd=ROOT, env={**ENV, **(env or {})},
                                     stdout=open(self.out, "w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.seen: set[int] = set()

    def until(self, check, timeout: float = 600, what: str = "") -> None:
        deadline = time.time() + timeout
        while not check():
            self.seen |= set(_descendants(self.proc.pid))
            assert self.proc.poll() is None, f"it ended before {what}:\n{self.text()[-3000:]}"
            assert time.time() < deadline, f"timed out waiting for {what}:\n{self.text()[-3000:]}"
            time.sleep(0.2)
        self.seen |= set(_descendants(self.proc.pid))

    def stop(self, sig: int, group: bool = False, timeout: float = 60) -> tuple[int, float]:
        """Send `sig` (to its process group: a terminal's Ctrl-C); (exit code, seconds it took)."""
        self.seen |= set(_descendants(self.proc.pid))
        sent = time.time()
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running {timeout} s after {signal.Signals(sig).name}:\n{self.text()[-3000:]}") from None
        return code, time.time() - sent

    def left(self, within: float = 5) -> list[int]:
        deadline = time.time() + within
        while any(_alive(p) for p in self.seen) and time.time() < deadline:
            time.sleep(0.1)
        alive = [p for p in self.seen if _alive(p)]
        for p in alive:  # only ours: recorded as its descendants
            os.kill(p, signal.SIGKILL)
        return alive

    def text(self) -> str:
        return self.out.read_text(errors="replace").replace("\r", "\n")

    def errors(self) -> list[str]:
        return [line for line in self.text().splitlines() if line.startswith("error:")]


@pytest.fixture
def big_corpus(tmp_path) -> Path:
    """A dataset_dir with a 30,000-document corpus: tokenizing it with 2 processes takes long enough to
    be interrupted (HF_DATASETS_CACHE points into tmp_path, so nothing is cached from another run)."""
    d = tmp_path / "data"
    d.mkdir()
    rng = random.Random(0)
    words = ("kubectl rollout restart deployment pod node service ingress helm chart prometheus alert grafana "
             "latency disk cpu memory oom log error warning timeout retry").split()  # fmt: skip
    with open(d / "big.jsonl", "w") as f:
        for _ in range(30000):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(150))}) + "\n")
    (d / "dataset_info.json").write_text(json.dumps({"big": {"file_name": "big.jsonl", "stage": "pt",
                                                             "columns": {"prompt": "text"}}}))  # fmt: skip
    return d


def _pt(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["pt", TINY_PT, f"model_name_or_path={model}", f"dataset_dir={data}", "dataset=big", f"output_dir={out}",
            "val_size=0", "eval_steps=null", "report_to=none", "max_steps=3", "preprocessing_num_workers=2", *extra]


def _tokenizing(out: Path, rank: int = 0):
    log = out / "logs" / f"rank{rank}.log"
    return lambda: log.is_file() and "tokenizing (num_proc=2)" in log.read_text(errors="replace")


# --- leftovers -------------------------------------------------------------------------------------
def test_stale_temporary_folders_are_those_of_dead_processes_on_this_machine(tmp_path):
    from devops_cli import lifeline

    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    for name in (f".m.tmp-{host}-{gone.pid}", f".m.tmp-{gone.pid}", f".m.tmp-{host}-{os.getpid()}",
                 f".m.tmp-{host}-{os.getppid()}", f".m.tmp-other-host-{gone.pid}", f".n.tmp-{host}-{gone.pid}"):
        (tmp_path / name).mkdir()
    stale = [p.name for p in lifeline.stale(tmp_path, ".m.tmp-")]
    # the dead process's (both namings); never this process's, a live one's, another machine's or another output's
    assert stale == sorted([f".m.tmp-{host}-{gone.pid}", f".m.tmp-{gone.pid}"])
    assert lifeline.tag() == f"{host}-{os.getpid()}"


# --- training ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_while_tokenizing_leaves_no_process(tiny_model, big_corpus, tmp_path):
    """torchrun with 2 workers, each forking a tokenizer pool of 2 (and datasets' manager): kill -9 of the
    CLI; the workers die with it (PR_SET_PDEATHSIG), their pools with them."""
    out = tmp_path / "run"
    run = Watched(*_pt(tiny_model, big_corpus, out, "nproc_per_node=2"), env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    run.until(lambda: _tokenizing(out)() and len(_descendants(run.proc.pid)) >= 4, what="the tokenizer pool")
    assert len(run.seen) >= 4, run.seen
    code, _ = run.stop(signal.SIGKILL)
    assert code == -9
    assert run.left() == [], f"{len(run.seen)} processes below the CLI; these outlived it by 5 s"


@pytest.mark.slow
@pytest.mark.parametrize("sig, group, code", [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)],
                         ids=["sigterm", "ctrl-c"])  # fmt: skip
def test_sigterm_and_ctrl_c_while_tokenizing_exit_promptly(sig, group, code, tiny_model, big_corpus, tmp_path):
    """One worker, in the CLI itself, tokenizing with a pool of 2. Ctrl-C at a terminal reaches the whole
    process group: the pool ignores it and the CLI ends the pool."""
    out = tmp_path / "run"
    run = Watched(*_pt(tiny_model, big_corpus, out, "nproc_per_node=1"), env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    run.until(lambda: _tokenizing(out)() and len(_descendants(run.proc.pid)) >= 2, what="the tokenizer pool")
    got, took = run.stop(sig, group=group)
    print(f"{sig.name} while tokenizing: exit {got} in {took:.1f} s")
    assert got == code, run.text()[-3000:]
    assert run.errors() == [f"error: stopped by {sig.name}"], run.text()[-3000:]
    assert "Traceback" not in run.text()
    assert took < 20
    assert run.left() == []


@pytest.mark.slow
def test_sigterm_while_waiting_for_the_other_nodes(tiny_model, tmp_path):
    """Node 0 waits in torch's rendezvous (a C++ call that lets no Python signal handler run): the
    command still ends, after lifeline.GRACE, with its line and 143."""
    from devops_cli import lifeline

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = Watched("pt", TINY_PT, f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'run'}", "nnodes=2",
                  "node_rank=0", "master_addr=127.0.0.1", f"master_port={port}", "val_size=0", "eval_steps=null")  # fmt: skip
    run.until(lambda: "pt →" in run.text(), what="the launch line")
    time.sleep(8)  # torch imported, the store listening for node 1
    code, took = run.stop(signal.SIGTERM)
    print(f"SIGTERM while node 0 waits for node 1: exit {code} in {took:.1f} s")
    assert code == 143, run.text()
    assert len(run.errors()) == 1 and run.errors()[0].startswith("error: stopped by SIGTERM"), run.text()
    assert took < lifeline.GRACE + 10
    assert run.left() == []


# --- quantize, convert ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs the quantize extra (gptqmodel)")
def test_sigterm_while_quantizing_is_143_with_one_line_and_no_scratch(tmp_path):
    from devops_cli.tiny import build

    model = build(tmp_path / "m", hidden_size=128)
    out = tmp_path / "q"
    run = Watched("quantize", "--model", str(model), "--output", str(out), "--calib-seq-len", "128",
                  "--calib-samples", "32")  # fmt: skip
    run.until(lambda: "GPTQ 2 blocks" in run.text(), what="GPTQ")
    time.sleep(1)
    code, took = run.stop(signal.SIGTERM)
    print(f"SIGTERM while quantizing: exit {code} in {took:.1f} s")
    assert code == 143, run.text()[-3000:]
    assert run.errors() == ["error: stopped by SIGTERM"] and "Traceback" not in run.text()
    assert took < 20
    assert not out.exists() and not list(tmp_path.glob(".q.quantize-*"))
    assert run.left() == []


@pytest.mark.slow
def test_convert_killed_leaves_a_folder_the_next_run_removes(tmp_path):
    from test_convert_kit import v1_config, v1_weights, write_v1

    cfg = v1_config("2023-08", seq_length=128)
    src = write_v1(tmp_path / "v1", cfg, v1_weights(cfg), "bin", 2)
    out = tmp_path / "qwen2"

    def temporary():
        return list(tmp_path.glob(".qwen2.tmp-*"))

    run = Watched("convert", "--model", str(src), "--output", str(out))
    run.until(temporary, what="the temporary folder")
    run.stop(signal.SIGKILL)
    left = temporary()
    assert len(left) == 1 and not out.exists()  # what kill -9 leaves: nothing can remove it then
    run = Watched("convert", "--model", str(src), "--output", str(out))
    run.until(lambda: list(tmp_path.glob(f".qwen2.tmp-*-{run.proc.pid}")), what="its own temporary folder")
    code, took = run.stop(signal.SIGTERM)  # SIGTERM: 143, and its own temporary folder goes
    assert code == 143 and run.errors() == ["error: stopped by SIGTERM"], run.text()
    assert temporary() == [] and not out.exists()
    assert f"removed {left[0].name}: the temporary folder of an interrupted convert (its process is gone)" in run.text()


def test_a_command_run_in_process_leaves_no_watcher_thread_behind():
    """Each command's stop watcher ends with the command: a process that runs many commands (a test
    session, a Python caller) must not pile up watcher threads (they once spun on the closed pipe's EOF,
    and a test session slowed down as they accumulated)."""
    import threading

    from devops_cli import lifeline

    def watchers() -> set:
        return {t for t in threading.enumerate() if t.name == "stop-watch"}

    before = watchers()
    for _ in range(3):
        with lifeline.on_stop_signals():
            assert len(watchers() - before) >= 1
    deadline = time.monotonic() + 5
    while watchers() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not watchers() - before
