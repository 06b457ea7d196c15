"""The one reading rule for the files this tool reads (dataset registries, data files, model configs):
each is read, or refused in one line naming it, the same way by every command and by the workers.

- A path must be a regular file: a dangling symlink, a folder, a device or fifo is refused by name.
- Text is UTF-8; a byte-order mark says otherwise (UTF-8 with BOM, UTF-16, UTF-32: read as such). Bytes
  that do not decode, and NUL bytes, are refused with the byte's offset: a binary file is not text.
- Compressed data files (`.gz`, `.bz2`, `.xz`; `.zst` with the zstandard package) are read through
  their decompressor, as the file they hold (`qa.jsonl.gz` is JSON lines). Any other suffix is not a
  data file.
- JSON documents (dataset_info.json, config.json) parse whole, or fail with file:line.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import stat
from pathlib import Path

from devops_cli.errors import DevopsError

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip


class NotText(ValueError):
    """A file's bytes are not text (undecodable, or NUL bytes); str(e) says which byte."""


def check_file(path, where: str | None = None, what: str = "file") -> Path:
    """`path` names a regular file that can be opened (raises DevopsError naming it otherwise)."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        if os.path.islink(p):
            raise DevopsError(f"{what} '{p}' is a symlink to '{os.readlink(p)}', which does not exist", where,
                              "point the link at the file, or copy the file there") from None
        raise DevopsError(f"{what} '{p}' not found", where) from None
    except OSError as e:
        raise DevopsError(f"cannot read {what} '{p}': {e.strerror}", where) from None
    if stat.S_ISDIR(mode):
        raise DevopsError(f"{what} '{p}' is a folder, not a file", where)
    if not stat.S_ISREG(mode):
        raise DevopsError(f"{what} '{p}' is not a regular file (a device, fifo or socket)", where)
    if not os.access(p, os.R_OK):
        raise DevopsError(f"cannot read {what} '{p}': permission denied", where, "fix its permissions")
    return p


def split_suffix(path) -> tuple[str, str | None]:
    """('.jsonl', '.gz') for qa.jsonl.gz; ('.jsonl', None) for qa.jsonl."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def open_binary(path, where: str | None = None):
    """The file's bytes, decompressed when its suffix says so."""
    p = check_file(path, where)
    compression = split_suffix(p)[1]
    if compression == ".gz":
        import gzip

        return gzip.open(p, "rb")
    if compression == ".bz2":
        import bz2

        return bz2.open(p, "rb")
    if compression == ".xz":
        import lzma

        return lzma.open(p, "rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DevopsError(f"'{p}' is zstd-compressed and the zstandard package is not installed", where,
                              f"pip install zstandard, or decompress it: zstd -d '{p}'") from None
        return zstandard.ZstdDecompressor().stream_reader(open(p, "rb"), closefd=True)
    return open(p, "rb")


def _encoding(head: bytes) -> str:
    return next((name for bom, name in _BOMS if head.startswith(bom)), "utf-8")


class _Lines:
    """Text lines of a binary stream, decoded by the file's BOM (UTF-8 without one); NotText on a byte
    that does not decode or a NUL byte, with its offset in the (decompressed) file."""

    def __init__(self, raw, newline: str | None):
        self.raw = io.BufferedReader(raw) if not hasattr(raw, "peek") else raw
        self.encoding = _encoding(self.raw.peek(4)[:4])
        self.text = io.TextIOWrapper(self.raw, encoding=self.encoding, errors="strict", newline=newline)
        self.offset = 0  # characters decoded so far (bytes, for the UTF-8 files nearly all are)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, size: int = -1) -> str:
        return self._checked(self.text.read(size))

    def readline(self, size: int = -1) -> str:
        return self._checked(self.text.readline(size))

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _checked(self, text: str) -> str:
        if "\x00" in text:
            name = self.encoding.upper().replace("-SIG", "")
            raise NotText(f"not {name} text (a NUL byte at character {self.offset + text.index(chr(0))}: a binary file?)")
        self.offset += len(text)
        return text

    def close(self) -> None:
        self.text.close()


def open_text(path, where: str | None = None, newline: str | None = None) -> _Lines:
    """A text stream of the file (decompressed, decoded by its BOM). Reading it raises NotText on bytes
    that are not text; `not_text(e, path)` makes the one line."""
    return _Lines(open_binary(path, where), newline)


def not_text(e: Exception, path) -> str:
    """The message for a file whose bytes are not text (UnicodeDecodeError or NotText)."""
    if isinstance(e, UnicodeDecodeError):
        byte = e.object[e.start : e.start + 1].hex() if e.object else "?"
        return (f"not {e.encoding.upper().replace('-SIG', '')} text (byte 0x{byte} cannot be decoded: a binary file, "
                "or another encoding?)")
    return str(e)


def read_json(path, where: str | None = None, what: str = "file"):
    """One JSON document: the parsed value, or DevopsError naming file:line (encodings as open_text)."""
    p = check_file(path, where, what)
    try:
        with open_text(p, where) as f:
            text = f.read()
    except (UnicodeDecodeError, NotText) as e:
        raise DevopsError(f"{p}: {not_text(e, p)}", where, "save it as UTF-8 JSON") from None
    except OSError as e:
        raise DevopsError(f"cannot read '{p}': {e.strerror or e}", where) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DevopsError(f"{p}:{e.lineno}: invalid JSON ({e.msg})", where, "fix the syntax") from None
    except RecursionError:
        raise DevopsError(f"{p}: JSON nested too deeply to read", where) from None
