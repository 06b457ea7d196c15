"""The only torchrun target: `python -m devops_cli.worker OUTPUT_DIR/recipe.yaml`.

Every rank writes its output to OUTPUT_DIR/logs/rank{RANK}.log; rank 0 also to the terminal.
Exit codes: 0 done, 2 a problem the user can fix (one line), 130 interrupted, 1 a crash (traceback).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", "0"))
    recipe_path = Path(argv[0])
    log = recipe_path.parent / "logs" / f"rank{rank}.log"
    log_file = tee_output(log, console=rank == 0)

    from .console import fail, quiet_imports
    from .errors import DevopsError

    quiet_imports()

    try:
        from . import recipe, train

        train.run(recipe.load(recipe_path))
    except DevopsError as e:
        for line in e.line().splitlines():
            fail(f"[rank {rank}] {line}")
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        import traceback

        import torch

        sys.stdout.flush()
        sys.stderr.flush()
        log_file.write(traceback.format_exc().encode())  # the whole story goes to the log only
        first = str(e).splitlines()[0] if str(e) else ""
        if isinstance(e, torch.OutOfMemoryError):
            fail(f"[rank {rank}] out of memory: {first} — lower per_device_train_batch_size or max_source_length, "
                 "set gradient_checkpointing: true, or use configs/deepspeed/zero3-offload.json")
        elif isinstance(e, torch.distributed.DistError) or "Connection closed by peer" in first:
            fail(f"[rank {rank}] lost contact with the other workers ({type(e).__name__}); traceback in {log}")
        else:
            fail(f"[rank {rank}] crashed: {type(e).__name__}: {first}; traceback in {log}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
