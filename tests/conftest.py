"""Shared fixtures: the tiny model (built once per session), the trained kit (pt -> sft LoRA -> merged ->
int4, built once per session on first use), sample datasets, and the CLI runners.

Nothing here downloads: models are built in code, data is written by the tests or bundled.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two test workers on the machine's cores: one OpenMP thread each (and in the CLI processes they start),
    # else four threads spin-wait against each other on 2 cores; set before anything imports torch
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# the workspace's shared folder beside the checkout (../shared), or beside the folder of worktrees
SHARED = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()), ROOT.parent / "shared")


@pytest.fixture(autouse=True)
def _leaves_the_process_as_it_found_it():
    """A command run in this process (a one-process training run sets RANK, MASTER_ADDR, MASTER_PORT and
    opens a process group on a TCPStore) must not leak into the tests after it: their CLI subprocesses
    would inherit MASTER_PORT and meet EADDRINUSE on the port this process still holds."""
    saved = dict(os.environ)
    yield
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from devops_cli.tiny import build

    return build(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory):
    """tiny_arch("qwen3") -> a tiny model of that architecture, built once per session."""
    from devops_cli.tiny import build

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build(tmp_path_factory.mktemp(arch.replace(".", "_")) / "model", arch=arch)
        return built[arch]

    return get


class TrainedKit:
    """The tiny model through the workflow, each stage built once per session when a test first asks:
    `pt` (configs/tiny-pt.yaml, two gloo workers under torchrun, PT_STEPS steps), `sft` (a LoRA adapter
    on pt: configs/tiny-sft.yaml, SFT_STEPS steps, in this process), `merged` (export --adapter sft) and
    `int4` (quantize merged: GPTQ on the bundled corpus). Tests that only read a trained model share it;
    none may write into it. Under pytest-xdist the workers share one kit: a stage is built under a file
    lock by the first worker that asks and read by the others."""

    PT_STEPS, SFT_STEPS = 60, 20

    def __init__(self, base: Path, root: Path):
        self.base, self.root = base, root
        root.mkdir(parents=True, exist_ok=True)

    def _stage(self, name: str, build) -> Path:
        from filelock import FileLock

        out, done = self.root / name, self.root / f"{name}.done"
        with FileLock(str(self.root / f"{name}.lock")):
            if not done.is_file():
                r = build(out)
                assert r.returncode == 0, f"kit {name}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
                done.touch()
        return out

    @functools.cached_property
    def pt(self) -> Path:
        return self._stage("pt", lambda out: run_cli(
            "pt", str(ROOT / "configs" / "tiny-pt.yaml"), f"model_name_or_path={self.base}", f"output_dir={out}",
            "nproc_per_node=2", f"max_steps={self.PT_STEPS}"))

    @functools.cached_property
    def sft(self) -> Path:
        return self._stage("sft", lambda out: run_main(
            "sft", str(ROOT / "configs" / "tiny-sft.yaml"), f"model_name_or_path={self.pt}", f"output_dir={out}",
            "finetuning_type=lora", "learning_rate=5e-3", f"max_steps={self.SFT_STEPS}"))

    @functools.cached_property
    def merged(self) -> Path:
        return self._stage("merged", lambda out: run_main("export", "--adapter", str(self.sft), "--output", str(out)))

    @functools.cached_property
    def int4(self) -> Path:
        return self._stage("int4", lambda out: run_main(
            "quantize", "--model", str(self.merged), "--output", str(out), "--calib-seq-len", "256",
            "--calib-samples", "64"))


@pytest.fixture(scope="session")
def kit(tiny_model, tmp_path_factory) -> TrainedKit:
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: beside every worker's own
    return TrainedKit(tiny_model, shared / "kit")


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from devops_cli.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model), "chatml")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A dataset_dir with one pt corpus, one alpaca sft set (with history) and one messages set."""
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "corpus.jsonl", [{"text": f"Document {i}: restart the pod with kubectl rollout restart."} for i in range(50)])
    write_jsonl(d / "qa.jsonl", [
        {"instruction": "What is a Pod?", "input": "", "output": "The smallest deployable unit.",
         "history": [["Hi", "Hello!"]]},
        {"instruction": "Check disk", "input": "df -h shows 100%", "output": "Delete old logs.", "history": []},
    ] * 10)  # fmt: skip
    write_jsonl(d / "chat.jsonl", [{"messages": [{"role": "user", "content": "ping?"},
                                                 {"role": "assistant", "content": "pong"}]}] * 10)
    (d / "dataset_info.json").write_text(json.dumps({
        "corpus": {"file_name": "corpus.jsonl", "stage": "pt", "columns": {"prompt": "text"}},
        "qa": {"file_name": "qa.jsonl", "stage": "sft",
               "columns": {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}},
        "chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"}},
    }))  # fmt: skip
    return d


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
            **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "devops_cli", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


class Ran:
    """What a CLI call left: returncode, stdout, stderr (the fields of subprocess.CompletedProcess)."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(*args: str, input: str = "", cwd: Path | None = None, env: dict | None = None) -> Ran:
    """The CLI in this process: `devops_cli.cli.main(argv)` with stdin given and stdout/stderr captured.
    For what fails (or finishes) before any worker starts; a fresh interpreter costs ~5 s of imports, so
    run_cli is for tests of the process itself (exit codes of signals, torch not imported, workers)."""
    import contextlib
    import io

    from devops_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_stdin = dict(os.environ), sys.stdin
    os.environ.update({"COLUMNS": "200", **(env or {})})
    sys.stdin = io.TextIOWrapper(io.BytesIO(input.encode("utf-8")), encoding="utf-8")
    try:
        with contextlib.chdir(cwd or ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.stdin = saved_stdin
    return Ran(code, out.getvalue(), err.getvalue())
