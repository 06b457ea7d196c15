"""The worker: torchrun's target, `python -m devops_cli.train.worker OUTPUT_DIR/recipe.yaml`, and for a
one-process run main() called in the devops-model process itself (launch.run_here).

Every rank writes its output to OUTPUT_DIR/logs/rank{RANK}.log; rank 0 also to the terminal.
Exit codes: 0 done, 2 a problem the user can fix (one line), 3 training diverged (a non-finite loss or
gradient norm; one line naming the step, no final model saved), 130 interrupted, 1 a crash (traceback).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path

from devops_cli.train.rundir import LAUNCHER_ENV, STARTED_ENV  # noqa: F401  (STARTED_ENV: read by run.Clock)


def tee_output(log: Path, console: bool):
    """Send this process's stdout/stderr (C level too) to `log`, and also to the terminal if `console`.
    Returns the log file, for what belongs in the log only."""
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "ab", buffering=0)
    if not console:
        for fd in (1, 2):
            os.dup2(f.fileno(), fd)
        return f
    threads = []
    for fd in (1, 2):
        read_end, write_end = os.pipe()
        original = os.dup(fd)
        os.dup2(write_end, fd)
        os.close(write_end)

        def pump(read_end=read_end, original=original):
            while chunk := os.read(read_end, 65536):
                os.write(original, chunk)
                f.write(chunk)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        threads.append((fd, original, t))

    def flush():
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original, t in threads:
            os.dup2(original, fd)  # closes the pipe's last write end: the pump sees EOF
            t.join(timeout=5)

    atexit.register(flush)
    return f




def die_with_launcher() -> None:
    """End this worker when the devops-model process that launched it ends, even by kill -9: no
    worker trains on unsupervised, holds GPUs, or writes into an output_dir that a rerun now owns. The
    processes it forks (the tokenizer pool of preprocessing_num_workers) die with it in turn."""
    from devops_cli import lifeline

    launcher = int(os.environ.get(LAUNCHER_ENV) or 0)
    if not launcher or launcher == os.getpid():  # not launched, or running in the launcher itself
        return
    lifeline.die_with_parent(launcher)
    lifeline.arm_children()


def disk_full(e: BaseException, output_dir: Path) -> str | None:
    """The one line for a save that ran out of disk (OSError ENOSPC, or torch's zip writer failing
    with 'unexpected pos' / 'file write failed' for the same reason), or None."""
    import shutil

    from devops_cli.outputs import is_disk_full

    if not is_disk_full(e):
        return None
    from devops_cli.train.rundir import last_checkpoint

    free = shutil.disk_usage(output_dir).free / 1e6
    done = last_checkpoint(output_dir)
    partial = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p != done and not (p / "trainer_state.json").is_file()]
    if done is not None:
        need = f"the checkpoint needs ~{_mb(done):.0f} MB (the size of {done.name})"
    else:
        need = "the checkpoint needs more" + (f" than the {_mb(partial[0]):.0f} MB written before it stopped" if partial else "")
    resume = f"; a rerun resumes from {done.name}" if done is not None else ""
    skipped = f" ({', '.join(p.name for p in partial)} is incomplete: resume skips it)" if partial else ""
    return f"no space left on device at {output_dir}: {free:.0f} MB free, {need}{skipped}{resume} — free space or move output_dir"


def _mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", "0"))
    recipe_path = Path(argv[0])
    log = recipe_path.parent / "logs" / f"rank{rank}.log"
    log_file = tee_output(log, console=rank == 0)

    from devops_cli.console import fail, fail_all, quiet_imports
    from devops_cli.errors import DevopsError, first_line

    quiet_imports()

    try:
        from devops_cli.train import lean, recipe

        r = recipe.load(recipe_path)
        hidden = lean.hide(lean.unused(r.model_name_or_path, r.quantization_bit, bool(r.deepspeed)))  # before transformers
        from devops_cli.console import info
        from devops_cli.train import run as train

        if hidden:
            info(f"not loaded (this run does not use them): {', '.join(hidden)}")
        train.run(r)
    except DevopsError as e:
        fail_all(e, f"[rank {rank}] ")
        return e.exit_code  # 2: a problem to fix; 3: training diverged (errors.Diverged)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        import traceback

        import torch

        from devops_cli import lifeline

        if lifeline.stopped_by():  # a stop signal's KeyboardInterrupt, replaced by a library's cleanup
            return 130
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            log_file.write(traceback.format_exc().encode())  # the whole story goes to the log only
        except OSError:
            pass  # the log sits in output_dir: a full disk refuses it too, and the line below says why
        first = first_line(e)
        if full := disk_full(e, recipe_path.parent):
            fail(f"[rank {rank}] {full}")
            return 2
        if isinstance(e, torch.OutOfMemoryError):
            fail(f"[rank {rank}] out of memory: {first} — lower per_device_train_batch_size or max_source_length, "
                 "set gradient_checkpointing: true, or use configs/deepspeed/zero3-offload.json")
        elif isinstance(e, torch.distributed.DistError) or "Connection closed by peer" in first:
            from devops_cli.train.rendezvous import peer_at, tidy

            who = peer_at(str(e)) or "the other workers"
            first = tidy(first)  # gloo: '[/path/pair.cc:553] What. Advice.' -> 'What'
            fail(f"[rank {rank}] lost contact with {who} ({type(e).__name__}: {first}) — its devops-model stopped "
                 f"or crashed (see that node's output), or the network between them failed; traceback in {log}")
        else:
            fail(f"[rank {rank}] crashed: {type(e).__name__}: {first}; traceback in {log}")
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    try:
        from devops_cli.train.arguments import end_process_group

        end_process_group()
    except Exception:  # a peer already gone: the exit code below says what happened to this run
        pass
    sys.exit(code)
