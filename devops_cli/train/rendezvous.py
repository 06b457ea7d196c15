"""The workers of a job meet before training, within rdzv_timeout (runs in each torchrun worker when
there is more than one).

1. Roll call on torchrun's own store (node 0's agent hosts it): each worker writes its rank, node and
   address, and waits for everyone's. A worker that does not come (its node's devops-model was killed,
   crashed before its workers started, or never ran them) is named: "node 1 (rank 1) did not join".
2. The process group, made with rdzv_timeout as its timeout and proved by one all_reduce (NCCL makes
   its communicator only then), so a network that lets the nodes meet at master_addr but not reach each
   other's workers (the loopback-hostname trap) fails within the bound too, naming the addresses.
3. Then collectives get the Trainer's ddp_timeout (default 1800 s) — a checkpoint save on rank 0 may
   keep the others waiting in a barrier for a long time, and that is no fault.

A worker that cannot meet the others raises DevopsError (the worker prints one line, exits 2). What
the roll call learnt (who is at which address) names the peer when contact is lost mid-run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

from devops_cli.errors import DevopsError, first_line
from devops_cli.train.network import NODE_ADDR_ENV

peers: dict[int, dict] = {}  # rank -> {"node", "host", "addr"} from the roll call


def _node_of(rank: int) -> int:
    return rank // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _who(ranks: list[int]) -> str:
    """'node 1 (rank 1)', 'node 1 (ranks 2, 3) and node 2 (rank 4)'."""
    by_node: dict[int, list[int]] = {}
    for r in ranks:
        by_node.setdefault(_node_of(r), []).append(r)
    parts = [f"node {n} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})" for n, rs in sorted(by_node.items())]
    return " and ".join(parts)


def roll_call(store, rank: int, world: int, timeout: float) -> dict[int, dict]:
    """Every rank's {"node", "host", "addr"}, once all have written theirs; DevopsError naming the ranks
    (and nodes) that did not within `timeout` seconds."""
    from datetime import timedelta

    prefix = f"devops-model/roll/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    me = {"node": int(os.environ.get("GROUP_RANK", _node_of(rank))), "host": socket.gethostname(),
          "addr": os.environ.get(NODE_ADDR_ENV, "")}
    keys = [f"{prefix}{r}" for r in range(world)]
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    deadline = time.monotonic() + timeout
    try:
        store.set(keys[rank], json.dumps(me))
        while True:
            try:
                store.wait(keys, timedelta(seconds=max(0.05, min(1.0, deadline - time.monotonic()))))
                break
            except Exception as e:  # the wait timed out (DistStoreError), or the store went away
                if "timeout" not in str(e).lower() and "timed out" not in str(e).lower():
                    raise
            if time.monotonic() >= deadline:
                missing = [r for r in range(world) if not store.check([keys[r]])]
                raise DevopsError(
                    f"{_who(missing)} did not join within {timeout:.0f} s (rdzv_timeout), waited on at {where}: its "
                    "devops-model stopped, crashed or never started its workers — see that node's output",
                    hint="rerun every node; rdzv_timeout=SECONDS waits longer for slow starts")
        values = store.multi_get(keys)
    except DevopsError:
        raise
    except Exception as e:
        raise DevopsError(f"lost node 0's rendezvous store at {where} ({first_line(e)}): node 0's devops-model "
                          "stopped or crashed — see its output") from None
    return {r: json.loads(v) for r, v in enumerate(values)}


def join(rdzv_timeout: int, backend: str, ddp_timeout: int) -> None:
    """Roll call, then the default process group (see the module doc). Nothing to do for one worker,
    or when the group already exists."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _set_pg_timeout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 or not dist.is_available() or dist.is_initialized():
        return
    rank = int(os.environ["RANK"])
    start = time.monotonic()
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False,
                          timedelta(seconds=rdzv_timeout))
    peers.update(roll_call(store, rank, world, rdzv_timeout))
    left = max(5.0, rdzv_timeout - (time.monotonic() - start))
    gpu = backend == "nccl"
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

    def failure(reason: str) -> DevopsError:
        others = "; ".join(f"{_who([r])} at {p['addr'] or p['host']}" for r, p in sorted(peers.items()) if r != rank)
        mine = ", ".join(f"{k}={os.environ[k]}" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if os.environ.get(k))
        return DevopsError(
            f"the workers met at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} but their process "
            f"group ({backend}) did not form within {left:.0f} s: {reason}",
            hint=f"the nodes must reach each other's workers: {others}; this node uses {mine or 'the hostname'} "
                 "— set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface they share, and open the ports")

    # gloo retries a connection up to 5 times, each with the full timeout: a watch keeps the bound
    formed = _watch(left + 5, lambda: failure("still connecting"), rank)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=left))
        probe = torch.ones(1, device="cuda" if gpu else "cpu")
        dist.all_reduce(probe)
        if gpu:
            torch.cuda.synchronize()
    except Exception as e:
        raise failure(tidy(first_line(e))) from None
    finally:
        formed.set()
    _set_pg_timeout(timedelta(seconds=ddp_timeout))


def _watch(seconds: float, error, rank: int):
    """An Event; unless it is set within `seconds`, this process prints error() as its one line and ends
    with 2 (the wait it bounds is a C++ call that releases the GIL but never returns in time)."""
    import sys
    import threading

    done = threading.Event()

    def expire():
        if done.wait(seconds):
            return
        from devops_cli.console import fail_all

        fail_all(error(), f"[rank {rank}] ")
        sys.stderr.flush()
        time.sleep(0.5)  # the log tee forwards the line
        os._exit(2)

    threading.Thread(target=expire, daemon=True, name="rendezvous-watch").start()
    return done


def tidy(text: str) -> str:
    """A gloo/c10d message without its source location and its advice: 'Connection closed by peer [10.0.0.1]:1234'."""
    text = re.sub(r"\[/[^\]]*:\d+\]\s*", "", text)
    return text.split(". ")[0].replace("$1", "").strip()


def peer_at(text: str) -> str | None:
    """'node 0 (rank 0) at 10.0.0.1' for the first address in an error text (gloo's 'Connection closed by
    peer [10.0.0.1]:1234') that the roll call knows; else the address alone; None without one."""
    found = re.search(r"\[([0-9A-Fa-f:.]+)\]:\d+", text)
    if not found:
        return None
    addr = found.group(1)
    ranks = [r for r, p in peers.items() if p.get("addr") == addr and r != int(os.environ.get("RANK", "0"))]
    nodes = sorted({_node_of(r) for r in ranks})
    return f"node {', '.join(map(str, nodes))} at {addr}" if nodes else addr
