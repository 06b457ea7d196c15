"""The run folder's rules, in one room: the live-run lock of output_dir, the marks of the checkpoints this
tool saves and which one a rerun resumes from, and the environment a launch hands its workers. No torch.
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from devops_cli.errors import DevopsError
from devops_cli.outputs import temp_prefix

LAUNCHER_ENV = "DEVOPS_MODEL_LAUNCHER_PID"
STARTED_ENV = "DEVOPS_MODEL_STARTED"  # when the devops-model command started (time.time()): run.Clock


def last_checkpoint(output_dir: Path) -> Path | None:
    """Newest complete checkpoint-N: the Trainer writes its trainer_state.json last, so one whose
    trainer_state.json is there and parses (a disk that filled up while writing it leaves it cut)."""
    if not output_dir.is_dir():
        return None
    done = [p for p in output_dir.glob("checkpoint-*") if p.name[11:].isdigit() and _state_ok(p / "trainer_state.json")]
    return max(done, key=lambda p: int(p.name[11:]), default=None)


def _state_ok(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


CHECKPOINT_MARK = ".devops-model-checkpoint"  # written into every checkpoint this tool saves (train.py)


def own_checkpoints(output_dir: Path) -> tuple[list[Path], list[Path]]:
    """(checkpoint-N folders a devops-model run saved here, other checkpoint-* entries), by the marker
    file each of ours carries; an unmarked folder is the user's, whatever it holds."""
    ours, others = [], []
    for p in sorted(output_dir.glob("checkpoint-*"), key=lambda p: (len(p.name), p.name)):
        (ours if p.is_dir() and p.name[11:].isdigit() and (p / CHECKPOINT_MARK).is_file() else others).append(p)
    return ours, others


LOCK = ".devops-model.lock"


def unstarted(output_dir: Path) -> bool:
    """output_dir holds nothing of a run yet: it is missing or empty but for what a starting devops-model
    node writes before recipe.yaml is in place (the lock, logs/, recipe.yaml's temporary name). On shared
    storage the nodes of one job start together, and node 0 may look while node 1 is writing."""
    if not output_dir.is_dir():
        return True
    staged = temp_prefix(output_dir / "recipe.yaml", "tmp")  # write_file's temporary name for it

    def starting_nodes(p: Path) -> bool:
        if p.name == "logs" and p.is_dir():
            return all(q.name.startswith("rank") and q.name.endswith(".log") for q in p.iterdir())
        return p.name == LOCK or p.name.startswith(staged)

    return all(starting_nodes(p) for p in output_dir.iterdir())


@contextmanager
def hold(output_dir: Path):
    """output_dir belongs to one live run. The lock file names the holder (pid, host, start) and stays
    flock-ed while the run lives; the kernel drops the lock when the process ends, even by kill -9,
    so a stale file never blocks a rerun."""
    import fcntl
    import time

    path = output_dir / LOCK
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise DevopsError(f"output_dir '{output_dir}' is in use by a live run ({holder})",
                          hint="wait for it to end or stop it, or choose another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
        yield
    finally:
        f.close()
