"""The one output guard: where any command writes, checked before any work starts, and how it writes.

Before: `new_output_dir` / `new_output_file` refuse, with one line each,
- an empty path, a name longer than the file system allows (room kept for the temporary name beside
  it), a path longer than it allows;
- a place that is, contains or is inside any input the command reads (model, adapter, data, source),
  compared as resolved paths (symlinks followed), with or without an overwrite flag: no flag may
  destroy an input, and no refusal suggests one that would;
- an existing path that is neither a regular file nor a folder (a device, fifo or socket: /dev/null,
  /dev/full), and anything under /proc, /sys or /dev (but /dev/shm): never renamed over;
- an existing non-empty folder (or existing file) without the overwrite flag;
- a place where no file can be created (tried for real: permissions alone do not tell).

While: `staged_dir` / `write_file` write under a temporary name in the same folder and rename at the
end, so nothing half-written ever looks complete; the temporary name goes on failure, and a full disk
(or quota) is one line naming the place, exit 2 (`disk_full`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from devops_cli.errors import DevopsError

TEMP_ROOM = 24  # bytes of a name kept for the temporary name beside it: ".NAME.tmp-PID"
SYSTEM = (Path("/proc"), Path("/sys"), Path("/dev"))
SYSTEM_OK = (Path("/dev/shm"),)  # a tmpfs: files belong there


# ----------------------------------------------------------------------------------------------
# Before any work: where the output may go
# ----------------------------------------------------------------------------------------------
def resolved(path) -> Path:
    """The absolute path with every symlink followed (a dangling one too, as far as it goes)."""
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _limits(path: Path) -> tuple[int, int]:
    probe = path
    while not os.path.exists(probe) and probe != probe.parent:  # os.path: a name too long is "not there"
        probe = probe.parent
    try:
        return os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def check_name(path, where: str | None) -> Path:
    """A path that can be made here: not empty, no part longer than the file system takes."""
    if path is None or not str(path).strip():
        raise DevopsError("the output path is empty", where, "name a folder or file to write to")
    p = Path(os.path.expanduser(str(path)))
    name_max, path_max = _limits(p.absolute())
    for part in p.parts:
        size = len(os.fsencode(part))
        if size > name_max - TEMP_ROOM and part not in ("/", "..", "."):
            raise DevopsError(f"a name in the output path is {size} bytes long ('{part[:40]}…'); this file system takes "
                              f"{name_max}, and {TEMP_ROOM} are kept for the temporary name beside it", where,
                              f"use names shorter than {name_max - TEMP_ROOM} bytes")
    size = len(os.fsencode(str(p.absolute())))
    if size >= path_max - TEMP_ROOM:
        raise DevopsError(f"the output path is {size} bytes long; this system takes {path_max}", where,
                          "choose a shorter path")
    return p


def check_kind(path: Path, where: str | None) -> None:
    """An existing output path is a regular file or a folder, and nothing is written under /proc, /sys
    or /dev: a device, fifo or socket is never renamed over or written into."""
    real = resolved(path)
    if any(real == s or s in real.parents for s in SYSTEM) and not any(real == s or s in real.parents for s in SYSTEM_OK):
        raise DevopsError(f"'{path}' is a system path ({real}), not a place for files", where,
                          "choose a folder on a disk")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise DevopsError(f"'{path}' is a symlink to '{os.readlink(path)}', which does not exist", where,
                              "remove the link, or choose another path") from None
        return
    except OSError as e:
        raise DevopsError(f"cannot look at '{path}': {e.strerror}", where) from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "a fifo" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise DevopsError(f"'{path}' exists and is {kind}, not a file or folder", where, "choose a file or folder path")


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "is inside"
    if out in inp.parents:
        return "contains"
    return None


def not_an_input(path, inputs, where: str | None) -> None:
    """`path` is none of `inputs` ({what: path} or (what, path) pairs; None skipped), is inside none, and
    contains none."""
    out = resolved(path)
    for what, inp in (inputs.items() if isinstance(inputs, dict) else inputs or ()):
        if inp is None or str(inp) == "":
            continue
        if not os.path.lexists(os.path.expanduser(str(inp))):
            continue  # a hub id, or nothing yet
        relation = _relation(out, resolved(inp))
        if relation:
            raise DevopsError(f"'{path}' {relation} the {what} this command reads ('{inp}')", where,
                              "an output may not be, hold or sit inside an input: choose another place")


def writable_or_raise(folder: Path, where: str | None) -> None:
    """A file can be created in `folder`, or in its nearest existing parent where it will be made.
    Tried with a file made and removed at once: permissions alone do not tell (root, read-only mounts)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise DevopsError(f"cannot make a folder under '{probe}': it is a file", where, "choose another path")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".devops-model-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise DevopsError(f"cannot write in '{probe}': {e.strerror}", where,
                          "choose a folder on a writable disk, or fix its permissions") from None


def new_output_dir(path, overwrite: bool, where: str | None = "--output", flag: str = "--overwrite",
                   inputs=None) -> Path:
    """`path` may receive a model: absent, empty, or `flag` given; never an input; and writable."""
    p = check_name(path, where)
    check_kind(p, where)
    not_an_input(p, inputs, where)
    if p.exists() and not p.is_dir():
        raise DevopsError(f"'{p}' exists and is a file", where, "choose a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise DevopsError(f"'{p}' exists and is not empty", where, f"choose another directory or pass {flag}")
    writable_or_raise(p, where)
    return p


def new_output_file(path, overwrite: bool, where: str | None = "--output", flag: str = "--overwrite",
                    inputs=None) -> Path:
    """`path` may receive a file: absent, or a regular file and `flag` given; never an input; writable."""
    p = check_name(path, where)
    check_kind(p, where)
    not_an_input(p, inputs, where)
    if p.is_dir():
        raise DevopsError(f"'{p}' is a directory", where, "name a file")
    if p.exists() and not overwrite:
        raise DevopsError(f"'{p}' exists", where, f"choose another path, or pass {flag} to overwrite it")
    writable_or_raise(p.parent, where)
    return p


# ----------------------------------------------------------------------------------------------
# While writing: a temporary name beside the output, renamed at the end
# ----------------------------------------------------------------------------------------------
def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a full disk or quota: OSError ENOSPC / EDQUOT, or a library's
    own error saying so (safetensors' SafetensorError, torch's zip writer: 'unexpected pos')."""
    chain, seen = [], e
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in chain):
        return True
    words = ("No space left on device", "Disk quota exceeded", "StorageFull", "unexpected pos", "file write failed")
    return any(w in str(x) for x in chain for w in words)


def disk_full(e: BaseException, place: Path, where: str | None = None) -> DevopsError | None:
    """The one line for a write that ran out of disk at `place`, or None when `e` is something else."""
    if not is_disk_full(e):
        return None
    probe = Path(place)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return DevopsError(f"no space left on device writing '{place}' ({free}); nothing was left there", where,
                       "free space, or choose an output on a disk with room")


def temp_prefix(out: Path, kind: str) -> str:
    """How the temporary names beside `out` begin (a process's own ends with its pid)."""
    return f".{out.name}.{kind}-"


def _temp_name(out: Path, kind: str) -> Path:
    return out.parent / f"{temp_prefix(out, kind)}{os.getpid()}"


@contextlib.contextmanager
def staged_dir(out, where: str | None = "--output"):
    """Yields a new folder beside `out` to write into; on success it becomes `out` (an old `out`, allowed
    by an overwrite flag, goes only once the new one is in place); on any failure it is removed, and a
    full disk is one line (DevopsError)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (full := disk_full(e, out, where)) is not None:
            raise full from None
        raise


def replace_dir(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and removed only after."""
    check_kind(out, None)
    old = None
    if out.is_dir():
        old = _temp_name(out, "old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    elif out.exists():
        out.unlink()
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_file(path, data: str | bytes, where: str | None = "--output") -> Path:
    """Write `data` to a temporary name beside `path`, then rename it over `path` (a regular file or
    nothing, checked again now); the temporary file goes on failure; a full disk is one line."""
    path = Path(path)
    check_kind(path, where)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if (full := disk_full(e, path, where)) is not None:
            raise full from None
        if isinstance(e, OSError):
            raise DevopsError(f"cannot write '{path}': {e.strerror or e}", where) from None
        raise
    return path
