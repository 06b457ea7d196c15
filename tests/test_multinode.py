"""Two nodes on one machine: two network namespaces joined by a veth pair (10.x addresses, loopback up),
one `devops-model pt` per node (1 gloo worker each) started inside its namespace with `ip netns exec`.

Each namespace gets its own /etc/hosts (`ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts) in
which this machine's hostname resolves to 127.0.1.1, as on Debian/Ubuntu hosts: left alone, gloo then
advertises a loopback address and the run cannot form (the trap every peer's multi-node users hit).
No test sets GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME except the one that shows what a wrong one does.

Needs root and network namespaces; skipped with the reason elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
TINY_PT = str(ROOT / "configs" / "tiny-pt.yaml")
OURS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
        "WORLD_SIZE", "RANK", "NPROC_PER_NODE")  # fmt: skip


@dataclass
class Node:
    ns: str
    link: str
    addr: str


def _sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _pids(ns: str) -> list[int]:
    return [int(p) for p in _sh("ip", "netns", "pids", ns).stdout.split()]


@pytest.fixture(scope="module")
def nodes():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("two nodes as network namespaces need root and iproute2 (`ip netns`)")
    tag = os.getpid() % 100000
    net = f"10.{100 + tag % 100}.{tag // 100 % 250}"
    a, b = Node(f"dmA{tag}", f"dmA{tag}", f"{net}.1"), Node(f"dmB{tag}", f"dmB{tag}", f"{net}.2")
    made: list[str] = []
    try:
        for n in (a, b):
            r = _sh("ip", "netns", "add", n.ns)
            if r.returncode:
                pytest.skip(f"cannot make a network namespace here: {r.stderr.strip()}")
            made.append(n.ns)
        steps = [("ip", "link", "add", a.link, "type", "veth", "peer", "name", b.link)]
        for n in (a, b):
            steps += [("ip", "link", "set", n.link, "netns", n.ns), ("ip", "-n", n.ns, "addr", "add", f"{n.addr}/24", "dev", n.link),
                      ("ip", "-n", n.ns, "link", "set", n.link, "up"), ("ip", "-n", n.ns, "link", "set", "lo", "up")]  # fmt: skip
        for step in steps:
            r = _sh(*step)
            if r.returncode:
                pytest.skip(f"cannot join the namespaces with a veth pair: {' '.join(step)}: {r.stderr.strip()}")
        host = socket.gethostname()
        for n in (a, b):
            folder = Path("/etc/netns") / n.ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {host}\n")
            # the trap is real in there: the hostname resolves to a loopback address
            seen = _sh("ip", "netns", "exec", n.ns, sys.executable, "-c", f"import socket; print(socket.gethostbyname({host!r}))")
            assert seen.stdout.strip() == "127.0.1.1", seen
        yield a, b
    finally:
        for ns in made:
            for pid in _pids(ns):  # only what the tests started lives in there
                os.kill(pid, signal.SIGKILL)
            _sh("ip", "netns", "del", ns)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


class Run:
    """One node's devops-model: its output lines with the time each arrived."""

    def __init__(self, node: Node, rank: int, master: Node, port: int, out: Path, *extra: str, env: dict | None = None):
        clean = {k: v for k, v in os.environ.items() if k not in OURS}
        argv = ["ip", "netns", "exec", node.ns, sys.executable, "-m", "devops_cli", "pt", TINY_PT, f"output_dir={out}",
                "val_size=0", "eval_steps=null", "report_to=none", "plot_loss=false", "save_steps=1000", "nnodes=2",
                "nproc_per_node=1", f"node_rank={rank}", f"master_addr={master.addr}", f"master_port={port}", *extra]  # fmt: skip
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**clean, "COLUMNS": "400", **(env or {})}, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        self.lines: list[tuple[float, str, str]] = []  # (time, "out" | "err", line)
        self.readers = [threading.Thread(target=self._read, args=(s, n), daemon=True)
                        for s, n in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]  # fmt: skip
        for t in self.readers:
            t.start()

    def _read(self, stream, name):
        for line in stream:
            self.lines.append((time.time(), name, line.rstrip("\n")))

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout} s:\n{self.text()}") from None
        for t in self.readers:
            t.join(timeout=10)
        return code

    def text(self, name: str | None = None) -> str:
        return "\n".join(line for _, n, line in self.lines if name is None or n == name)

    def errors(self) -> list[str]:
        return [line for _, n, line in self.lines if n == "err" and line.startswith("error:")]

    def when(self, text: str) -> float:
        return next(t for t, _, line in self.lines if text in line)


def _nothing_left(*ns: Node, within: float = 10) -> None:
    deadline = time.time() + within
    while any(_pids(n.ns) for n in ns) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_pids(n.ns) for n in ns), {n.ns: _pids(n.ns) for n in ns}


def test_two_nodes_find_their_network_without_any_variable(nodes, tiny_model, tmp_path):
    a, b = nodes
    out = tmp_path / "run"
    runs = [Run(n, rank, a, 29501, out, f"model_name_or_path={tiny_model}", "max_steps=2", "rdzv_timeout=120")
            for rank, n in enumerate(nodes)]  # fmt: skip
    codes = [r.wait(600) for r in runs]
    assert codes == [0, 0], "\n\n".join(r.text() for r in runs)
    for r, n in zip(runs, nodes):
        banner = r.text("out")
        assert f"network: {n.link} ({n.addr}) routes to master_addr; GLOO_SOCKET_IFNAME={n.link} [chosen], " \
               f"NCCL_SOCKET_IFNAME=={n.link} [chosen]" in banner, banner
        assert "resolves to the loopback address 127.0.1.1" in r.text("err")
        assert "Traceback" not in r.text()
    assert "done: 2 steps" in runs[0].text("out")
    assert '"world_size": 2' in (out / "metrics.json").read_text()
    _nothing_left(a, b)


def test_a_node_killed_mid_run_ends_the_other_with_one_line(nodes, tiny_model, tmp_path):
    a, b = nodes
    out = tmp_path / "run"
    runs = [Run(n, rank, a, 29502, out, f"model_name_or_path={tiny_model}", "max_steps=1000", "rdzv_timeout=120")
            for rank, n in enumerate(nodes)]  # fmt: skip
    log = out / "logs" / "rank0.log"
    deadline = time.time() + 600
    while not (log.is_file() and "/1000 [" in log.read_text(errors="replace")):  # training has begun
        assert time.time() < deadline and all(r.proc.poll() is None for r in runs), "\n\n".join(r.text() for r in runs)
        time.sleep(0.5)
    runs[0].proc.kill()  # kill -9 of node 0's devops-model: the master, which holds the rendezvous store
    killed = time.time()
    code = runs[1].wait(120)
    took = time.time() - killed
    print(f"node 1 exited {took:.1f} s after kill -9 of node 0")
    assert code == 1, runs[1].text()
    errors = runs[1].errors()
    assert len(errors) == 1 and f"lost contact with node 0 at {a.addr}" in errors[0], runs[1].text()
    assert "Traceback" not in runs[1].text()
    assert took < 60
    runs[0].wait(10)
    _nothing_left(a, b)  # node 0's worker died with its CLI, node 1's with the job


def test_a_node_that_never_starts_ends_node_0_within_rdzv_timeout(nodes, tiny_model, tmp_path):
    a, b = nodes
    run = Run(a, 0, a, 29503, tmp_path / "run", f"model_name_or_path={tiny_model}", "max_steps=2", "rdzv_timeout=15")
    code = run.wait(300)
    assert code == 2, run.text()
    errors = run.errors()
    assert len(errors) == 1 and f"node 0 waited 15 s (rdzv_timeout) on {a.addr}:29503 for the other nodes: 1 of 2 came" \
        in errors[0], run.text()  # fmt: skip
    waited = run.lines[-1][0] - run.when("pt →")
    print(f"node 0 exited {waited:.1f} s after its launch line (rdzv_timeout=15)")
    assert waited < 15 + 45  # + torchrun's start in this process on a loaded machine
    assert "Traceback" not in run.text()
    _nothing_left(a, b)


def test_a_wrong_interface_set_by_the_user_fails_within_rdzv_timeout(nodes, tiny_model, tmp_path):
    """The user's GLOO_SOCKET_IFNAME wins (the banner says so): set to lo, the workers meet at master_addr
    but advertise 127.0.0.1 to each other — the hang of the issue, now bounded and named on both nodes."""
    a, b = nodes
    runs = [Run(n, rank, a, 29504, tmp_path / "run", f"model_name_or_path={tiny_model}", "max_steps=2",
                "rdzv_timeout=20", env={"GLOO_SOCKET_IFNAME": "lo"}) for rank, n in enumerate(nodes)]  # fmt: skip
    codes = [r.wait(300) for r in runs]
    assert codes == [2, 2], "\n\n".join(r.text() for r in runs)
    for r in runs:
        assert "GLOO_SOCKET_IFNAME=lo [env]" in r.text("out")
        errors = r.errors()
        assert len(errors) == 1 and f"the workers met at {a.addr}:29504 but their process group (gloo) did not form" \
            in errors[0], r.text()  # fmt: skip
        assert "this node uses GLOO_SOCKET_IFNAME=lo" in errors[0]
        assert "Traceback" not in r.text()
    for r in runs:
        print(f"{r.errors()[0]}  ({r.lines[-1][0] - r.when('pt →'):.1f} s after its launch line)")
    _nothing_left(a, b)
