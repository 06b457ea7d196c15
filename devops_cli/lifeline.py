"""A command's life and death: SIGTERM and Ctrl-C end it promptly with 143 / 130 and one line, at any
phase; every process it forks dies with it, even when it is killed -9; and what an earlier, killed run
of it left behind (a temporary folder) is recognised as such.

- Stopping: the first SIGTERM or SIGINT raises KeyboardInterrupt in the main thread (Python's own Ctrl-C
  behaviour, for SIGTERM too), so `finally` blocks clean up; `stopped_by()` remembers the signal even
  when a library's cleanup replaces the KeyboardInterrupt with an exception of its own (datasets does).
  A C call that does not return to Python (a rendezvous wait in torch's TCPStore) never lets that
  handler run: a watcher thread, woken by the signal itself (signal.set_wakeup_fd), ends the process
  after GRACE seconds if it is still alive, with the same line and code.
- Children: every process forked while this is armed gets PR_SET_PDEATHSIG(SIGKILL) (the kernel kills it
  when its parent dies, kill -9 included), SIGTERM's default action (a pool's terminate() ends it), and
  SIGINT ignored (Ctrl-C at a terminal reaches the whole process group; the parent decides). The
  datasets tokenizer pool (`preprocessing_num_workers`), its manager process and DataLoader workers are
  forked this way.
- Leftovers: temporary folders are named `PREFIX<host>-<pid>` (`tag()`); `stale(folder, prefix)` lists
  those of this machine whose process is gone.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

GRACE = 10.0  # seconds a stopping command has to unwind before it is ended anyway
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}

_stopped: list[int] = []
_reported: list[int] = []
_libc = None
_armed = False


# ----------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT
# ----------------------------------------------------------------------------------------------
def stopped_by() -> int | None:
    """The signal that asked this command to stop, or None."""
    return _stopped[0] if _stopped else None


def forget() -> None:
    """A new command (main() may run several in one process: tests) starts with no stop recorded."""
    _stopped.clear()
    _reported.clear()


def report(signum: int | None = None) -> int:
    """Print the stop's one line (once, whoever asks first) and return its exit code (143, 130)."""
    signum = signum or stopped_by() or signal.SIGINT
    if not _reported:
        from devops_cli.console import fail

        _reported.append(signum)
        fail(stop_line(signum))
    return EXIT.get(signum, 128 + signum)


def stop_line(signum: int) -> str:
    return f"stopped by {signal.Signals(signum).name}"


def _handler(signum, frame):
    if _stopped:  # a second signal while unwinding: the watcher's deadline already runs
        return
    _stopped.append(signum)
    raise KeyboardInterrupt


def _watch(read_fd: int, grace: float) -> None:
    """Wake on the first stop signal (the C-level handler writes its number here at once), then give
    the main thread `grace` seconds to unwind before ending the process with the same line and code."""
    while True:
        try:
            data = os.read(read_fd, 16)
        except OSError:
            return
        if not data:  # EOF: the command ended (its __exit__ closed the write end), and so does its watcher
            os.close(read_fd)
            return
        signums = [b for b in data if b in (signal.SIGTERM, signal.SIGINT)]
        if signums:
            break
    signum = signums[0]
    time.sleep(grace)
    from devops_cli.console import fail

    try:
        if not _reported:
            fail(f"{stop_line(signum)}; it did not wind down within {grace:.0f} s, so it ends now")
    finally:
        os._exit(EXIT.get(signum, 128 + signum))


class on_stop_signals:
    """Context manager for a command's main(): the handlers above, the watcher, and children that die
    with the process. Restores the previous handlers on exit (tests call main() in-process)."""

    def __init__(self, grace: float = GRACE):
        self.grace = grace

    def __enter__(self):
        _stopped.clear()
        if threading.current_thread() is not threading.main_thread():
            return self
        self.previous = {s: signal.signal(s, _handler) for s in EXIT}
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        try:
            self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        except ValueError:
            self.previous_fd = None
        threading.Thread(target=_watch, args=(self.read_fd, self.grace), daemon=True, name="stop-watch").start()
        arm_children()
        return self

    def __exit__(self, *exc):
        if not hasattr(self, "previous"):
            return False
        for s, h in self.previous.items():
            signal.signal(s, h)
        if self.previous_fd is not None:
            signal.set_wakeup_fd(self.previous_fd)
        os.close(self.write_fd)  # the watcher's read ends (EOF) unless a signal already woke it
        disarm_children()
        return False


# ----------------------------------------------------------------------------------------------
# Children die with their parent
# ----------------------------------------------------------------------------------------------
def _load_libc():
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    return _libc


def _prctl_pdeathsig(sig: int) -> bool:
    """PR_SET_PDEATHSIG for the calling process (Linux); False where it is not available."""
    libc = _load_libc()
    try:
        return bool(libc) and libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except AttributeError:
        return False


def die_with_parent(parent: int) -> None:
    """End this process when `parent` (its parent now) ends, kill -9 included: the kernel's
    PR_SET_PDEATHSIG on Linux, else a thread polling the parent pid."""
    armed = _prctl_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)
    if not armed:

        def watch():
            while os.getppid() == parent:
                threading.Event().wait(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="parent-watch").start()


_fork_parent: list[int] = []


def _before_fork() -> None:
    _fork_parent[:] = [os.getpid()]


def _child_after_fork() -> None:
    if not _armed:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)  # the parent's watcher pipe is not the child's
    except ValueError:
        pass
    if _fork_parent:
        die_with_parent(_fork_parent[0])


_registered = False


def arm_children() -> None:
    """From now on, every process this one forks dies with it (see the module doc)."""
    global _armed, _registered
    if not _registered:
        os.register_at_fork(before=_before_fork, after_in_child=_child_after_fork)
        _registered = True
    _load_libc()  # now, not in a freshly forked child
    _armed = True


def disarm_children() -> None:
    global _armed
    _armed = False


# ----------------------------------------------------------------------------------------------
# Leftovers of killed runs
# ----------------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def tag() -> str:
    """HOST-PID, the suffix of a temporary folder: `stale` can tell whose it is on a shared disk."""
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


def stale(folder: Path, prefix: str) -> list[Path]:
    """Entries `folder/PREFIX<host>-<pid>` (or `PREFIX<pid>`, older) made on this machine by a process
    that no longer runs (a run killed -9 or by a power cut could not remove them itself). Those of
    other machines (a shared disk) and of live processes stay."""
    import socket

    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    here = socket.gethostname()
    out = []
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        host, _, pid = p.name[len(prefix):].rpartition("-")
        if pid.isdigit() and host in ("", here) and int(pid) != os.getpid() and not pid_alive(int(pid)):
            out.append(p)
    return sorted(out)
