"""torchrun argv and the multi-node environment conventions."""

from __future__ import annotations

import shlex

import pytest

from conftest import run_cli
from devops_cli.errors import DevopsError
from devops_cli.train import launch, recipe


def _r(**kw):
    return recipe.build({"stage": "pt", "model_name_or_path": "m", "dataset": "d", "output_dir": "o", **kw}, {}, "t.yaml")


def test_codefuse_convention_world_size_is_nodes():
    plan = launch.plan(_r(), env={"WORLD_SIZE": "4", "RANK": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456",
                                  "CUDA_VISIBLE_DEVICES": ""})
    assert (plan.nnodes, plan.node_rank, plan.master_addr, plan.master_port) == (4, 2, "10.1.2.3", 23456)
    assert plan.sources["nnodes"] == "env WORLD_SIZE" and plan.sources["node_rank"] == "env RANK"
    assert plan.nproc_per_node == 1


def test_llamafactory_convention_wins_over_codefuse_and_recipe_wins_over_env():
    env = {"NNODES": "2", "NODE_RANK": "1", "WORLD_SIZE": "16", "RANK": "9", "MASTER_ADDR": "h", "CUDA_VISIBLE_DEVICES": "0,1,2"}
    plan = launch.plan(_r(), env=env)
    assert (plan.nnodes, plan.node_rank, plan.nproc_per_node) == (2, 1, 3)
    assert plan.master_port == 29500  # multi-node: a fixed port every node agrees on
    plan = launch.plan(_r(nnodes=1, node_rank=0, nproc_per_node=2), env=env)
    assert (plan.nnodes, plan.node_rank, plan.nproc_per_node) == (1, 0, 2) and plan.sources["nnodes"] == "recipe"


def test_several_nodes_need_a_master_address():
    with pytest.raises(DevopsError, match=r"2 nodes \[env NNODES\] but no master address"):
        launch.plan(_r(), env={"NNODES": "2", "NODE_RANK": "1"})
    assert launch.plan(_r(master_addr="10.0.0.1"), env={"NNODES": "2", "NODE_RANK": "1"}).master_addr == "10.0.0.1"


def test_node_rank_out_of_range_from_env():
    with pytest.raises(DevopsError, match=r"node rank 3 \[env RANK\] is not below nnodes 2 \[env WORLD_SIZE\]"):
        launch.plan(_r(), env={"WORLD_SIZE": "2", "RANK": "3", "MASTER_ADDR": "h"})


def test_argv_is_a_list_and_paths_with_spaces_survive(tmp_path, data_dir, tiny_model):
    out = tmp_path / "my runs" / "first try"
    argv = launch.torchrun_argv(launch.plan(_r(nproc_per_node=2), env={}), out / "recipe.yaml")
    assert argv[0] == "torchrun" and argv[-1] == str(out / "recipe.yaml")
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    # --dry-run prints the same argv, shell-quoted, and runs nothing
    r = run_cli("pt", "model_name_or_path=" + str(tiny_model), f"dataset_dir={data_dir}", "dataset=corpus",
                f"output_dir={out}", "nproc_per_node=2", "--dry-run")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert shlex.split(last)[-1] == str(out / "recipe.yaml") and shlex.split(last)[0] == "torchrun"
    assert "nproc_per_node: 2" in r.stdout and not out.exists()


# --- several nodes: the network, the rendezvous bound ----------------------------------------------
def test_the_interface_that_routes_to_master_addr_is_chosen_unless_set():
    from devops_cli.train import network

    net = network.choose("127.0.0.1", env={})
    assert (net.address, net.interface) == ("127.0.0.1", "lo")
    assert net.env == {"DEVOPS_MODEL_NODE_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "=lo"}
    assert net.sources == {"GLOO_SOCKET_IFNAME": "chosen", "NCCL_SOCKET_IFNAME": "chosen"}
    assert "loopback address: only nodes on this same machine" in net.warnings[0]
    net = network.choose("127.0.0.1", env={"GLOO_SOCKET_IFNAME": "eth7"})  # the user's wins, and says so
    assert net.env["GLOO_SOCKET_IFNAME"] == "eth7" and net.sources["GLOO_SOCKET_IFNAME"] == "env"
    assert "GLOO_SOCKET_IFNAME=eth7 [env], NCCL_SOCKET_IFNAME==lo [chosen]" in net.describe()
    with pytest.raises(DevopsError, match="master_addr 'node-0.invalid' does not resolve on this node"):
        network.choose("node-0.invalid", env={})


def test_dry_run_of_several_nodes_names_the_interface_and_the_timeout(tiny_model, tmp_path, capsys):
    from devops_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pt", f"model_name_or_path={tiny_model}", "dataset=devops_corpus_en", f"output_dir={tmp_path / 'o'}",
              "nnodes=2", "node_rank=1", "master_addr=127.0.0.1", "rdzv_timeout=45", "--dry-run"])
    out = capsys.readouterr().out
    assert e.value.code in (0, None), out
    assert "the other nodes awaited 45 s (rdzv_timeout); network: lo (127.0.0.1) routes to master_addr; " \
           "GLOO_SOCKET_IFNAME=lo [chosen], NCCL_SOCKET_IFNAME==lo [chosen]" in out
    assert "--rdzv-conf timeout=45" in out
    with pytest.raises(SystemExit) as e:
        main(["pt", f"model_name_or_path={tiny_model}", "dataset=devops_corpus_en", f"output_dir={tmp_path / 'o'}",
              "rdzv_timeout=0", "--dry-run"])
    assert e.value.code == 2 and "rdzv_timeout must be >= 1, got 0" in capsys.readouterr().err


def test_the_roll_call_names_who_did_not_join(monkeypatch):
    """Rank 0 of four (two per node) waits 1 s on a real TCPStore; rank 1 came, node 1's ranks 2 and 3 never did."""
    import json
    import time
    from datetime import timedelta

    from torch.distributed import TCPStore

    from devops_cli.train import rendezvous

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    store = TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    store.set("devops-model/roll/none/0/1", json.dumps({"node": 0, "host": "h", "addr": "10.0.0.1"}))
    started = time.monotonic()
    with pytest.raises(DevopsError) as e:
        rendezvous.roll_call(store, 0, 4, timeout=1)
    assert time.monotonic() - started < 4
    assert f"node 1 (ranks 2, 3) did not join within 1 s (rdzv_timeout), waited on at 127.0.0.1:{store.port}" in e.value.line()
    for r in (2, 3):
        store.set(f"devops-model/roll/none/0/{r}", json.dumps({"node": 1, "host": "h2", "addr": "10.0.0.2"}))
    peers = rendezvous.roll_call(store, 0, 4, timeout=1)
    assert peers[2]["addr"] == "10.0.0.2" and peers[0]["node"] == 0
    rendezvous.peers.update(peers)
    assert rendezvous.peer_at("Connection closed by peer [10.0.0.2]:4242") == "node 1 at 10.0.0.2"
    assert rendezvous.tidy("[/__w/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:4242. "
                           "This is typically caused by a remote worker crashing.") == "Connection closed by peer [10.0.0.2]:4242"


def test_torchrun_agent_logs_nothing_below_critical():
    """We report torchrun's failures in one line of ours; its agent's own error logs (the exit barrier's
    traceback when node 0 closes its store first) stay out. Each elastic module sets its own logger's
    level, so the parents' level alone did not reach them."""
    import logging

    import torch.distributed.run  # noqa: F401  (imports the agent, whose logger sets its own level)

    from devops_cli.train import launch

    launch.quiet_torchrun_loggers()
    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.rendezvous.dynamic_rendezvous",
                 "torch.distributed.run"):
        assert not logging.getLogger(name).isEnabledFor(logging.ERROR), name
