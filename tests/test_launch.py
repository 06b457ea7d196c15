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
