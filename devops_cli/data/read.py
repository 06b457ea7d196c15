"""Documents from files and folders: one reading rule, every format to one kind of text.

The reading rule (`walk`):
- Folders are walked in sorted order (the same inputs give the same order, run after run); names
  starting with '.' (.git, .cache) are skipped.
- A symlink to a file is followed only when its target lies inside one of the input folders (and is
  read once, however many links reach it); a symlink to a folder is never followed (no loops, no
  escape from the tree); a broken or looping link is a counted skip.
- Folders named in `exclude` (the command's own output) are not entered.
- A file larger than `max_bytes` (after gunzip), a binary file (a known binary suffix, or a NUL byte
  in its first 8 KB), or text in no encoding we can tell is a counted skip, never an error.

Every format becomes Markdown-like text, so that later stages treat all of them alike: headings are
`#` lines (HTML's <h1>-<h6>; reStructuredText's underlined titles stay as written), code is fenced
with ``` (HTML's <pre>), paragraphs are separated by a blank line.
- Markdown, reStructuredText, plain text (and config files, scripts: any text file): as written.
- HTML: Resiliparse's extractor (navigation elements dropped by selector; main_content=False,
  because its main-content heuristic drops headings and paragraphs of manual pages).
- PDF: pypdfium2 page text; lines that repeat on most pages (running headers, page numbers) dropped.
- `.gz` files: decompressed, then read by the suffix before `.gz` (Debian ships its docs that way).

Encodings: UTF-8; UTF-16/32 (byte order mark, or the NUL pattern of UTF-16 without one); UTF-8 with
a few bad bytes (replaced, at most 1 in 1000); GB18030 (legacy Chinese) when it decodes strictly.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from devops_cli.errors import DevopsError

MAX_BYTES = 64 * 1024 * 1024  # per file, after decompression
FORMATS = {".md": "markdown", ".markdown": "markdown", ".mdx": "markdown", ".rst": "rst", ".txt": "text",
           ".text": "text", ".html": "html", ".htm": "html", ".xhtml": "html", ".pdf": "pdf"}  # fmt: skip
BINARY = set(
    ".png .jpg .jpeg .gif .bmp .ico .webp .tif .tiff .svgz .psd .mp3 .mp4 .wav .ogg .avi .mov .mkv .webm "
    ".zip .tar .tgz .bz2 .xz .zst .7z .rar .jar .war .whl .deb .rpm .iso .img .dmg .exe .dll .so .dylib .a .o "
    ".pyc .class .bin .dat .db .sqlite .pkl .pt .pth .safetensors .gguf .npy .npz .parquet .arrow .woff .woff2 "
    ".ttf .otf .eot .doc .docx .xls .xlsx .ppt .pptx .odt .epub".split())  # fmt: skip
HTML_SKIP = ["nav", "header", "footer", "aside", "[role=navigation]", "[role=banner]", "[role=contentinfo]",
             ".navheader", ".navfooter", ".navbar", ".breadcrumb", ".breadcrumbs", ".sidebar", ".toc", ".menu",
             "#toc", "#sidebar", "#navigation", ".skip-link", ".headerlink"]  # fmt: skip
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+_:.])\1{2,}[ \t]*$")
FENCE = re.compile(r"^[ \t]{0,3}(```|~~~)")


@dataclass
class Document:
    text: str
    source: str  # the path as reached from the inputs given
    title: str
    sections: list[tuple[int, str, int]] = field(default_factory=list)  # (level, heading, character offset)
    format: str = "text"


@dataclass
class Skip:
    source: str
    reason: str


# ----------------------------------------------------------------------------------------------
# Walking
# ----------------------------------------------------------------------------------------------
def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def walk(paths: Iterable[str | Path], exclude: Iterable[Path] = ()) -> Iterator[Path | Skip]:
    """Files to read (Path), and what was passed over (Skip), in a stable order. A named input that
    does not exist is a DevopsError: the command cannot guess what was meant."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists() and not p.is_symlink():
            raise DevopsError(f"'{p}' does not exist", "DOCS", "name files or folders of documents")
    roots = [p.resolve() for p in paths if p.is_dir()]
    excluded = [Path(e).resolve() for e in exclude]
    seen: set[Path] = set()

    def file(path: Path, named: bool) -> Path | Skip | None:
        if path.is_symlink():
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError):
                return Skip(str(path), "broken or looping symlink")
            if target.is_dir():
                return Skip(str(path), "symlink to a folder (not followed)")
            if not named and not _inside(target, roots):
                return Skip(str(path), "symlink out of the input folders (not followed)")
        else:
            target = path.resolve()
        if target in seen:
            return Skip(str(path), "already read (the same file by another path)")
        seen.add(target)
        return path

    for p in paths:
        if not p.is_dir():
            found = file(p, named=True)
            if found is not None:
                yield found
            continue
        stack = [p]
        while stack:
            folder = stack.pop()
            if folder.resolve() in excluded:
                yield Skip(str(folder), "the command's output folder")
                continue
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as e:
                yield Skip(str(folder), f"unreadable folder ({e.strerror})")
                continue
            subfolders = []
            for entry in entries:
                path = Path(entry.path)
                if entry.name.startswith("."):
                    yield Skip(str(path), "hidden")
                elif entry.is_dir(follow_symlinks=False):
                    subfolders.append(path)
                elif entry.is_symlink() or entry.is_file(follow_symlinks=False):
                    found = file(path, named=False)
                    if found is not None:
                        yield found
                else:
                    yield Skip(str(path), "not a regular file")
            stack.extend(reversed(subfolders))


# ----------------------------------------------------------------------------------------------
# Bytes -> text
# ----------------------------------------------------------------------------------------------
class Unreadable(Exception):
    """A file passed over: the message is the reason counted in the report."""


def load_bytes(path: Path, max_bytes: int = MAX_BYTES) -> bytes:
    size = path.stat().st_size
    if path.suffix.lower() == ".gz":
        with gzip.open(path, "rb") as f:
            try:
                data = f.read(max_bytes + 1)
            except (OSError, EOFError) as e:
                raise Unreadable(f"broken gzip ({e})") from None
    else:
        if size > max_bytes:
            raise Unreadable(f"larger than {max_bytes // 2**20} MB (--max-file-mb)")
        data = path.read_bytes()
    if len(data) > max_bytes:
        raise Unreadable(f"larger than {max_bytes // 2**20} MB (--max-file-mb)")
    return data


def decode(data: bytes) -> str:
    """Text from bytes by the rules in the module's docstring; Unreadable when none applies."""
    for bom, codec in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                       (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):  # fmt: skip
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError:
                raise Unreadable(f"invalid {codec.upper().replace('-SIG', '')} (it starts with a byte order mark)") from None
    head = data[:8192]
    if len(head) >= 16 and head.count(0) * 4 >= len(head) and not head.count(b"\x00\x00\x00"):
        odd, even = head[1::2].count(0), head[0::2].count(0)  # UTF-16 without a BOM: NULs at one parity
        codec = "utf-16-le" if odd > even * 4 else "utf-16-be" if even > odd * 4 else None
        if codec:
            try:
                return data.decode(codec)
            except UnicodeDecodeError:
                raise Unreadable(f"invalid {codec.upper()}") from None
    if b"\x00" in head:
        raise Unreadable("binary (NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    if text.count("\ufffd") * 1000 <= len(text):
        return text
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError:
        raise Unreadable("not text in UTF-8, UTF-16 or GB18030") from None
    cjk = sum(1 for c in text[:4000] if "\u4e00" <= c <= "\u9fff")
    if cjk * 10 < min(len(text), 4000):
        raise Unreadable("not text in UTF-8, UTF-16 or GB18030")
    return text


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------
def format_of(path: Path) -> str | None:
    """'markdown' | 'rst' | 'text' | 'html' | 'pdf', None for a known binary suffix; other suffixes
    are read as text when the bytes are text (config files, scripts, READMEs without a suffix)."""
    name = path.name.lower()
    suffix = Path(name[:-3]).suffix if name.endswith(".gz") else path.suffix.lower()
    if suffix in BINARY:
        return None
    return FORMATS.get(suffix, "text")


def headings(text: str) -> list[tuple[int, str, int]]:
    """(level, title, offset) of the Markdown `#` headings and reStructuredText underlined titles
    outside code fences, in order. rst levels follow the order in which underline characters appear."""
    out, in_code, offset, prev, rst_levels = [], False, 0, None, {}
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        if FENCE.match(stripped):
            in_code = not in_code
        elif not in_code:
            m = HEADING.match(stripped)
            if m:
                out.append((len(m.group(1)), m.group(2).strip(), offset))
            elif prev and RST_UNDERLINE.match(stripped) and prev[0].strip() and \
                    len(stripped.strip()) >= len(prev[0].strip()) and not RST_UNDERLINE.match(prev[0]):
                level = rst_levels.setdefault(stripped.strip()[0], len(rst_levels) + 1)
                out.append((level, prev[0].strip(), prev[1]))
        prev = (stripped, offset)
        offset += len(line)
    return out


def _html(text: str) -> tuple[str, str]:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(text)
    body = tree.body or tree.document
    for level in range(1, 7):  # headings become Markdown headings, <pre> becomes a fenced block
        for e in body.query_selector_all(f"h{level}"):
            words = " ".join(e.text.split())
            if words:
                e.text = "#" * level + " " + words
    for e in body.query_selector_all("pre"):
        code = e.text.strip("\n")
        if code.strip():
            e.text = "```\n" + code + "\n```"
    out = extract_plain_text(tree, preserve_formatting=True, main_content=False, skip_elements=HTML_SKIP,
                             alt_texts=False, links=False, list_bullets=True)
    # table cells come out tab-separated: one " | " between cells, outside code
    lines, in_code = [], False
    for line in out.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        lines.append(line if in_code else re.sub(r"\s*\t+\s*", " | ", line).strip(" |") if "\t" in line else line)
    return "\n".join(lines), " ".join((tree.title or "").split())


def _pdf(data: bytes) -> tuple[str, str]:
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        raise Unreadable(f"unreadable PDF ({e})") from None
    try:
        pages = []
        for i in range(len(doc)):
            page = doc[i]
            textpage = page.get_textpage()
            pages.append(textpage.get_text_range().replace("\r\n", "\n").replace("\r", "\n").split("\n"))
            textpage.close()
            page.close()
        title = (doc.get_metadata_dict().get("Title") or "").strip()
    finally:
        doc.close()
    # running headers and footers: a line (digits masked) among the first/last 2 of most pages
    if len(pages) >= 4:
        from collections import Counter

        def key(line: str) -> str:
            return re.sub(r"\d+", "0", line.strip())

        edges = Counter(k for lines in pages for k in {key(x) for x in lines[:2] + lines[-2:] if x.strip()})
        running = {k for k, n in edges.items() if n >= len(pages) / 2}
        pages = [[x for i, x in enumerate(lines) if not ((i < 2 or i >= len(lines) - 2) and key(x) in running)]
                 for lines in pages]
    return "\n\n".join("\n".join(lines).strip() for lines in pages if any(x.strip() for x in lines)), title


def parse(data: bytes, kind: str, path: Path) -> Document:
    """One file's bytes -> a Document (Unreadable when the file is passed over)."""
    if kind == "pdf":
        text, title = _pdf(data)
    else:
        text = decode(data).replace("\r\n", "\n").replace("\r", "\n")
        title = ""
        if kind == "html":
            text, title = _html(text)
    sections = headings(text)
    stem = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Document(text=text, source=str(path), title=title or (sections[0][1] if sections else Path(stem).stem),
                    sections=sections, format=kind)


def read_file(path: Path, max_bytes: int = MAX_BYTES) -> Document | Skip:
    kind = format_of(path)
    if kind is None:
        return Skip(str(path), f"binary ({path.suffix.lower()})")
    try:
        return parse(load_bytes(path, max_bytes), kind, path)
    except Unreadable as e:
        return Skip(str(path), str(e))
    except OSError as e:
        return Skip(str(path), f"unreadable ({e.strerror or e})")


def read_documents(paths: Iterable[str | Path], exclude: Iterable[Path] = (), max_bytes: int = MAX_BYTES,
                   skips: list[Skip] | None = None) -> Iterator[Document]:
    """Every readable document under `paths`, in walk order; what was passed over goes to `skips`."""
    for found in walk(paths, exclude):
        got = found if isinstance(found, Skip) else read_file(found, max_bytes)
        if isinstance(got, Skip):
            if skips is not None:
                skips.append(got)
        else:
            yield got
