"""Cleaning text for training: broken Unicode, whitespace, boilerplate lines, length.

Code is the point of DevOps documents, so nothing here changes a line inside a ``` fence or an
indented (4 spaces / tab) block, and whitespace inside lines is never collapsed (aligned output,
YAML and Makefiles keep their shape).

- `fix`: mojibake repaired by ftfy, on the lines that show its signature only (UTF-8 read as Latin-1
  or cp1252: 'Ã©', 'â€™'); ftfy on every line costs 0.4 M characters/s, the filter almost nothing.
  Width and quotes stay as written (Chinese full-width punctuation is not mojibake).
- `normalize`: one newline convention, control and zero-width characters removed, no-break spaces
  made spaces (outside code), trailing spaces stripped, runs of blank lines cut to one.
- Boilerplate: lines (outside code, not headings) that appear in many documents — navigation bars,
  running footers, copyright lines. `line_keys` gives a document's candidate lines as 64-bit hashes;
  the corpus counts them over all documents and `drop_lines` removes those counted too often.
"""

from __future__ import annotations

import re

FENCE = re.compile(r"^[ \t]{0,3}(```|~~~)")
MOJIBAKE = re.compile("[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
                      "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]")
# C0/C1 controls but tab and newline, zero-width characters, BOMs, soft hyphen
INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\u00ad]")
MAX_LINE_CHARS = 20_000  # a longer "line" is minified code or data, never prose or a snippet


def _config():
    from ftfy import TextFixerConfig

    return TextFixerConfig(uncurl_quotes=False, fix_character_width=False, fix_latin_ligatures=False,
                           unescape_html=False, normalization=None, explain=False)


def fix(text: str) -> str:
    """Repair mojibake on the lines that have its signature; the rest is returned untouched."""
    if not MOJIBAKE.search(text):
        return text
    import ftfy

    config = _config()
    return "".join(ftfy.fix_text(line, config) if MOJIBAKE.search(line) else line
                   for line in text.splitlines(keepends=True))


def code_mask(lines: list[str]) -> list[bool]:
    """True for each line that is code: inside a ``` / ~~~ fence (fences included) or indented."""
    out, in_code = [], False
    for line in lines:
        if FENCE.match(line):
            out.append(True)
            in_code = not in_code
        else:
            out.append(in_code or line.startswith(("    ", "\t")))
    return out


def normalize(text: str) -> tuple[str, int]:
    """-> (text, lines dropped as too long)."""
    text = INVISIBLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = text.split("\n")
    code = code_mask(lines)
    out, blank, long = [], 0, 0
    for line, is_code in zip(lines, code):
        if len(line) > MAX_LINE_CHARS:
            long += 1
            continue
        line = line.rstrip()
        if not is_code:
            line = line.replace("\u00a0", " ")
        if not line:
            blank += 1
            if blank > 1 and not is_code:
                continue
        else:
            blank = 0
        out.append(line)
    return "\n".join(out).strip("\n"), long


def _key(line: str) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(" ".join(line.split()).encode("utf-8"))


def _candidates(text: str):
    """(index, line) of the lines that may be boilerplate: not code, not a heading, not blank."""
    lines = text.split("\n")
    for i, (line, is_code) in enumerate(zip(lines, code_mask(lines))):
        if not is_code and line.strip() and not line.lstrip().startswith("#"):
            yield i, line


def line_keys(text: str) -> set[int]:
    """The document's candidate boilerplate lines, as 64-bit hashes of their words (each once)."""
    return {_key(line) for _, line in _candidates(text)}


def drop_lines(text: str, keys: set[int] | frozenset[int]) -> tuple[str, list[str]]:
    """-> (text without the candidate lines whose hash is in `keys`, the lines dropped)."""
    if not keys:
        return text, []
    drop = {i: line for i, line in _candidates(text) if _key(line) in keys}
    if not drop:
        return text, []
    lines = [line for i, line in enumerate(text.split("\n")) if i not in drop]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n"), list(drop.values())


def clean(text: str) -> tuple[str, int]:
    """fix + normalize: -> (text, long lines dropped)."""
    return normalize(fix(text))
