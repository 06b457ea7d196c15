"""Documents cut into chunks along their headings, for a teacher to write questions about.

A chunk is one section (a `#` heading and what follows, down to the next heading of any level) with
its heading path ("Install > Packages > apt") as context. Sections shorter than `min_chars` are joined
with the next ones; a section longer than `max_chars` is cut at paragraph boundaries (blank lines) —
never inside a fenced code block, which stays whole even when it alone passes `max_chars` (a command
cut in half teaches nothing). The documents come from `data.read` (Markdown-like text: `#` headings,
``` fences), so every format is cut the same way. No torch, no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
FENCE = re.compile(r"^[ \t]{0,3}(```|~~~)")


@dataclass
class Chunk:
    text: str
    source: str
    title: str
    heading: str  # the heading path, "A > B > C"
    index: int = 0  # position in its document


def blocks(text: str) -> list[str]:
    """Paragraphs (split on blank lines) with each fenced code block kept whole, fences included."""
    out, current, fence = [], [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is not None:
            current.append(line)
            if m and m.group(1) == fence:
                fence = None
            continue
        if m:
            fence = m.group(1)
            current.append(line)
        elif not line.strip():
            if current:
                out.append("\n".join(current))
                current = []
        else:
            current.append(line)
    if current:
        out.append("\n".join(current))
    return out


def sections(text: str) -> list[tuple[list[str], str]]:
    """(heading path, body) per section, headings outside code fences only."""
    out: list[tuple[list[str], list[str]]] = [([], [])]
    path: list[tuple[int, str]] = []
    fence = None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and (h := HEADING.match(line)):
            level = len(h.group(1))
            path = [p for p in path if p[0] < level] + [(level, h.group(2).strip())]
            out.append(([t for _, t in path], [line]))
            continue
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
        out[-1][1].append(line)
    return [(p, "\n".join(body).strip()) for p, body in out if "\n".join(body).strip()]


def split_long(body: str, max_chars: int) -> list[str]:
    parts, current = [], ""
    for block in blocks(body):
        if current and len(current) + 2 + len(block) > max_chars:
            parts.append(current)
            current = block
        else:
            current = f"{current}\n\n{block}" if current else block
    if current:
        parts.append(current)
    return parts


def chunk_text(text: str, source: str, title: str, max_chars: int = 3000, min_chars: int = 300) -> list[Chunk]:
    out: list[Chunk] = []
    pending_path: list[str] = []
    pending = ""
    for path, body in sections(text):
        if pending and len(pending) + 2 + len(body) > max_chars:
            out += [Chunk(p, source, title, " > ".join(pending_path)) for p in split_long(pending, max_chars)]
            pending, pending_path = "", []
        pending = f"{pending}\n\n{body}" if pending else body
        pending_path = pending_path or path
        if len(pending) >= min_chars:
            out += [Chunk(p, source, title, " > ".join(pending_path)) for p in split_long(pending, max_chars)]
            pending, pending_path = "", []
    if pending:
        if out and len(pending) < min_chars and len(out[-1].text) + 2 + len(pending) <= max_chars:
            out[-1].text += "\n\n" + pending
        else:
            out += [Chunk(p, source, title, " > ".join(pending_path)) for p in split_long(pending, max_chars)]
    for i, c in enumerate(out):
        c.index = i
    return out
