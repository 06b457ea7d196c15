"""torchrun (or, for one process, the worker in this process): the argv (a list, never a re-split string), the multi-node conventions, and running it.

Multi-node values come from the recipe, else from the environment, in both conventions users have:
  CodeFuse-DevOps-Model scripts: WORLD_SIZE = number of nodes, RANK = node rank
  LLaMA-Factory:                 NNODES, NODE_RANK
plus MASTER_ADDR / MASTER_PORT, and NPROC_PER_NODE.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from devops_cli.errors import DevopsError
from devops_cli.train.machine import visible_gpus
from devops_cli.train.network import Network
from devops_cli.train.recipe import Recipe


@dataclass
class Launch:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    sources: dict[str, str] = field(default_factory=dict)  # value -> where it came from
    rdzv_timeout: int = 300  # seconds a node waits for the others at start-up (recipe key rdzv_timeout)
    network: Network | None = None  # several nodes: the interface the workers use (network.choose)

    def describe(self) -> str:
        s = self.sources
        text = (f"{self.nnodes} node(s) [{s['nnodes']}], this is node {self.node_rank} [{s['node_rank']}], "
                f"{self.nproc_per_node} worker(s) per node [{s['nproc_per_node']}], "
                f"master {self.master_addr}:{self.master_port} [{s['master_addr']}, {s['master_port']}]")
        if self.nnodes > 1:
            text += f", the other nodes awaited {self.rdzv_timeout} s (rdzv_timeout)"
            if self.network is not None:
                text += f"; {self.network.describe()}"
        return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_env(env, name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DevopsError(f"environment variable {name}={value!r} is not an integer") from None


def plan(r: Recipe, env=os.environ) -> Launch:
    src: dict[str, str] = {}

    def pick(key: str, candidates: list[tuple[str, object]], default, default_src: str):
        if getattr(r, key) is not None:
            src[key] = "recipe"
            return getattr(r, key)
        for name, value in candidates:
            if value is not None:
                src[key] = f"env {name}"
                return value
        src[key] = default_src
        return default

    nnodes = pick("nnodes", [("NNODES", _int_env(env, "NNODES")), ("WORLD_SIZE", _int_env(env, "WORLD_SIZE"))], 1, "default")
    node_rank = pick("node_rank", [("NODE_RANK", _int_env(env, "NODE_RANK")), ("RANK", _int_env(env, "RANK"))], 0, "default")
    master_addr = pick("master_addr", [("MASTER_ADDR", env.get("MASTER_ADDR") or None)], "127.0.0.1", "default")
    gpus = visible_gpus(env)
    nproc = pick("nproc_per_node", [("NPROC_PER_NODE", _int_env(env, "NPROC_PER_NODE"))], max(gpus, 1),
                 f"{gpus} visible GPU(s)" if gpus else "no GPU: 1")
    if nnodes > 1:
        port = pick("master_port", [("MASTER_PORT", _int_env(env, "MASTER_PORT"))], 29500, "default")
    else:
        port = pick("master_port", [("MASTER_PORT", _int_env(env, "MASTER_PORT"))], None, "a free port")
        port = port or free_port()
    if nnodes < 1 or nproc < 1:
        raise DevopsError(f"nnodes ({nnodes}) and nproc_per_node ({nproc}) must be >= 1")
    if nnodes > 1 and src["master_addr"] == "default":  # each node would wait on its own 127.0.0.1
        raise DevopsError(f"{nnodes} nodes [{src['nnodes']}] but no master address",
                          hint="set master_addr=<node 0's address> or MASTER_ADDR on every node")
    if not 0 <= node_rank < nnodes:
        raise DevopsError(f"node rank {node_rank} [{src['node_rank']}] is not below nnodes {nnodes} [{src['nnodes']}]",
                          hint="set node_rank=0..nnodes-1 on each node")
    return Launch(nproc, nnodes, node_rank, str(master_addr), int(port), src, r.rdzv_timeout)


def torchrun_argv(launch: Launch, recipe_path: Path) -> list[str]:
    return [
        "torchrun",
        "--nnodes", str(launch.nnodes),
        "--nproc-per-node", str(launch.nproc_per_node),
        "--node-rank", str(launch.node_rank),
        "--master-addr", launch.master_addr,
        "--master-port", str(launch.master_port),
        "--monitor-interval", "1",
        "--rdzv-conf", f"timeout={launch.rdzv_timeout}",  # node 0 waits this long for the others, they for it
        "-m", "devops_cli.train.worker", str(recipe_path),
    ]  # fmt: skip


def in_process(launch: Launch) -> bool:
    """One worker on one node: it runs in the command's own process (no torchrun, no second interpreter
    with its second torch import)."""
    return launch.nnodes == 1 and launch.nproc_per_node == 1


def worker_argv(launch: Launch, recipe_path: Path) -> list[str]:
    """What runs the job: torchrun, or for one process the worker itself (the same command by hand)."""
    if in_process(launch):
        return ["python", "-m", "devops_cli.train.worker", str(recipe_path)]
    return torchrun_argv(launch, recipe_path)


def display(argv: list[str]) -> str:
    return shlex.join(argv)


def run(argv: list[str], log_dir: Path, launch: Launch | None = None) -> int:
    """Run torchrun (the real one: torch.distributed.run) in this process; return the exit code.

    A worker that dies (even kill -9) ends the job within seconds: torchrun's agent notices, stops the
    other workers, and we name the rank and its log instead of printing torchrun's traceback. A node
    that cannot meet the others within rdzv_timeout says which address it waited on.
    """
    quiet_agent_logs()
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    from devops_cli.console import fail

    quiet_torchrun_loggers()
    try:
        torchrun(parse_args(argv[1:]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        log = log_dir / f"rank{rank}.log"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            fail(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) was killed by {name}; its log: {log}")
            return 128 - code
        said = worker_said(log)
        if said and rank != 0:  # its one line went to its log only (rank 0's reached this terminal)
            for line in said:
                fail(line)
        if not said and code not in (2, 3):  # 2: a DevopsError, 3: diverged (their line is in the log)
            fail(f"rank {rank} (local rank {failure.local_rank}) exited with code {code}; its log: {log}")
        return code
    except SignalException as e:  # torchrun's handlers, once its workers run
        fail(f"stopped by {signal.Signals(e.sigval).name}; every worker was stopped")
        return 128 + int(e.sigval)
    except KeyboardInterrupt:  # the command's own (lifeline), before torchrun took over
        from devops_cli import lifeline

        return lifeline.report()
    except DistError as e:  # the rendezvous of the nodes' agents, before any worker started
        fail(rendezvous_failure(e, launch))
        return 2
    return 0


TORCHRUN_LOGGERS = ("torch.distributed.elastic", "torch.distributed.run")


def quiet_torchrun_loggers() -> None:
    """torchrun's agent and launcher log nothing below CRITICAL here: we report failures ourselves, in one
    line. Each of their modules sets its own logger's level (torch's elastic get_logger), so the level goes
    on every one of them, not only on the parents (a successful multi-node run otherwise ended with the
    agent's exit-barrier traceback when node 0 closed its store first)."""
    import logging

    for name in [*TORCHRUN_LOGGERS, *logging.root.manager.loggerDict]:
        if name.startswith(TORCHRUN_LOGGERS):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def quiet_agent_logs() -> None:
    """torch's C++ log lines (a rendezvous retry prints one with 20 stack frames, a peer's address that
    does not reverse-resolve another) stay out of this process's output: its failures get one line of
    ours. Read once, when torch loads; the workers keep the user's setting (the variable is restored)."""
    import sys

    if "torch" in sys.modules or "TORCH_CPP_LOG_LEVEL" in os.environ or os.environ.get("DEVOPS_MODEL_DEBUG"):
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        import torch  # noqa: F401
    finally:
        del os.environ["TORCH_CPP_LOG_LEVEL"]


def worker_said(log: Path) -> list[str]:
    """The one-line reasons a worker gave for failing (its log's last `error: [rank N] ...` lines)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 16384))
            tail = f.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
    except OSError:
        return []
    lines = [t.strip() for t in tail if t.strip()]
    said = []
    while lines and lines[-1].startswith("error: [rank "):
        said.insert(0, lines.pop().removeprefix("error: "))
    return said


def rendezvous_failure(e: Exception, launch: Launch | None) -> str:
    """One line for a rendezvous that did not complete: who waited, on which address, for whom."""
    import re

    from devops_cli.errors import first_line

    text = first_line(e)
    if launch is None:
        return f"the rendezvous of the nodes failed: {text}"
    at, t, n = f"{launch.master_addr}:{launch.master_port}", launch.rdzv_timeout, launch.nnodes
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if launch.node_rank == 0 and joined:
        missing = n - int(joined.group(1))
        return (f"node 0 waited {t} s (rdzv_timeout) on {at} for the other nodes: {joined.group(1)} of {n} came, "
                f"{missing} never connected — start devops-model on every node with nnodes={n} "
                f"master_addr={launch.master_addr} master_port={launch.master_port}, and check that they reach {at}")
    if launch.node_rank != 0 and ("timed out" in text or "connect" in text):
        return (f"node {launch.node_rank} could not reach node 0 at {at} within {t} s (rdzv_timeout) — start node 0 "
                f"too, and check that {launch.master_addr} is its address and port {launch.master_port} is open "
                f"to this node ({text})")
    return f"node {launch.node_rank}: the rendezvous at {at} failed within {t} s (rdzv_timeout): {text}"


def run_here(launch: Launch, recipe_path: Path) -> int:
    """Run the one worker in this process, with the environment torchrun would give it (a process group
    of one, as under torchrun, so DeepSpeed and the Trainer take the same path); return its exit code.
    Ctrl-C and SIGTERM stop it as they stop a torchrun job (130, 143; the command's lifeline handlers
    turn them into KeyboardInterrupt); kill -9 leaves nothing behind (its forked children die with it)."""
    from devops_cli import lifeline
    from devops_cli.train import lean, worker
    from devops_cli.train.arguments import end_process_group

    given = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", GROUP_RANK="0",
                 MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    before = {k: os.environ.get(k) for k in given}
    os.environ.update(given)
    hidden = lean.hidden_now()
    try:
        code = worker.main([str(recipe_path)])
    finally:  # the process (a Python caller's, a test's) goes on: its environment, port and imports as they were
        end_process_group()
        lean.unhide(hidden)
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return lifeline.report() if code == 130 else code


def process_started() -> float:
    """When this process started (time.time() clock; Linux /proc, 10 ms), else now."""
    import time

    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(") ", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def env_for_workers(launch: Launch | None = None) -> None:
    """Settings every worker inherits (set before torchrun spawns them, or the in-process worker runs):
    for several nodes, the interface gloo and NCCL use (network.choose)."""
    from devops_cli.train.rundir import LAUNCHER_ENV, STARTED_ENV

    if launch is not None and launch.network is not None:
        os.environ.update(launch.network.env)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault(STARTED_ENV, str(process_started()))  # the start-up phases count from here
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the workers' parent: they end with it (worker.die_with_launcher)


