"""The one rule for where a command writes: an existing non-empty output folder is replaced only with
an explicit flag, and the place must be writable (tried for real, before any work starts)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from devops_cli.errors import DevopsError


def new_output_dir(path: Path, overwrite: bool, where: str | None = "--output", flag: str = "--overwrite") -> None:
    """`path` may receive a model: absent, empty, or `flag` given; and writable."""
    if path.exists() and not path.is_dir():
        raise DevopsError(f"'{path}' exists and is a file", where, "choose a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DevopsError(f"'{path}' exists and is not empty", where, f"choose another directory or pass {flag}")
    writable_or_raise(path, where)


def writable_or_raise(folder: Path, where: str | None) -> None:
    """A file can be created in `folder`, or in its nearest existing parent where it will be made.
    Tried with a file made and removed at once: permissions alone do not tell (root, read-only mounts)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".devops-model-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise DevopsError(f"cannot write in '{probe}': {e.strerror}", where,
                          "choose a folder on a writable disk, or fix its permissions") from None
