"""Log-aware input for piped text (`kubectl logs pod | devops-model chat --prompt "why?"`).

clean(): ANSI colour/cursor codes stripped, carriage-return progress bars reduced to their final
state, runs of lines that differ only in numbers (timestamps, counters, retry n) collapsed.
fit(): when the log is still too long for the token budget, keep its head, the lines around error
lines (most recent first) and its tail, with "[… N lines omitted …]" markers, and say what was kept.
"""

from __future__ import annotations

import re

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
ERROR = re.compile(r"error|exception|fatal|panic|traceback|fail|crash|oom|killed|denied|refused|"
                   r"timed? ?out|unavailable|backoff|exit(?:ed)? (?:code|status)|segfault|\bE\d{4} ", re.I)
_DIGITS = re.compile(r"\d+")
_CONTEXT = 2  # lines kept either side of an error line
_MAX_LINE_CHARS = 2000


def clean(text: str) -> str:
    text = ANSI.sub("", text).replace("\r\n", "\n")
    lines = []
    for line in text.split("\n"):
        if "\r" in line:  # progress bars redraw with \r: keep what was on screen last
            line = [part for part in line.split("\r") if part.strip()][-1:] or [""]
            line = line[0]
        line = line.rstrip()
        if len(line) > _MAX_LINE_CHARS:
            line = line[:_MAX_LINE_CHARS // 2] + f" […{len(line) - _MAX_LINE_CHARS} chars…] " + line[-_MAX_LINE_CHARS // 2:]
        lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(_collapse(lines))


def _collapse(lines: list[str], keep: int = 2) -> list[str]:
    """Runs of more than 2*keep lines equal up to their numbers -> first keep, a marker, last keep."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        shape = _DIGITS.sub("0", lines[i])
        j = i
        while j + 1 < len(lines) and _DIGITS.sub("0", lines[j + 1]) == shape:
            j += 1
        run = lines[i:j + 1]
        if len(run) > 2 * keep + 1:
            out += run[:keep] + [f"[… {len(run) - 2 * keep} similar lines …]"] + run[-keep:]
        else:
            out += run
        i = j + 1
    return out


def fit(text: str, budget: int, count) -> tuple[str, str | None]:
    """Fit `text` into `budget` tokens (count(str) -> int). Returns (text, notice or None)."""
    if budget <= 0:
        return "", "the piped input was left out: the window has no room for it"
    if count(text) <= budget:
        return text, None
    lines = text.split("\n")
    costs = [count(line) + 1 for line in lines]
    errors = [i for i, line in enumerate(lines) if ERROR.search(line)]
    target = budget
    for _ in range(8):  # markers cost tokens too: shrink the target until the result fits
        keep = _choose(costs, errors, target)
        result = _assemble(lines, keep)
        if count(result) <= budget:
            break
        target = int(target * 0.85)
    kept_errors = sum(1 for i in errors if i in keep)
    notice = (f"the piped input was too long for the window ({sum(costs)} tokens, budget {budget}): kept "
              f"{len(keep)} of {len(lines)} lines — head, tail and {kept_errors} of {len(errors)} error lines "
              "with their context")
    return result, notice


def _choose(costs: list[int], errors: list[int], budget: int) -> set[int]:
    keep: set[int] = set()
    used = 0

    def take(indices, limit) -> None:
        nonlocal used
        for i in indices:
            if i in keep:
                continue
            if used + costs[i] > limit:
                return
            keep.add(i)
            used += costs[i]

    n = len(costs)
    take(range(n), budget * 0.15)  # head: how it started (versions, config)
    take(range(n - 1, -1, -1), budget * 0.4)  # tail: the most recent lines, where it died
    for e in reversed(errors):  # error lines with context, most recent first
        if used >= budget:
            break
        block = [e, *range(max(0, e - _CONTEXT), e), *range(e + 1, min(n, e + _CONTEXT + 1))]
        take(block, budget * 0.9)
    take(range(n - 1, -1, -1), budget)  # whatever is left: more tail
    return keep


def _assemble(lines: list[str], keep: set[int]) -> str:
    out: list[str] = []
    previous = -1
    for i in sorted(keep):
        if i != previous + 1:
            out.append(f"[… {i - previous - 1} lines omitted …]")
        out.append(lines[i])
        previous = i
    if previous != len(lines) - 1:
        out.append(f"[… {len(lines) - 1 - previous} lines omitted …]")
    return "\n".join(out)


def attach(question: str, log: str) -> str:
    """The user message: the question, then the log in a fenced block."""
    fence = "```"
    while fence in log:
        fence += "`"
    return f"{question}\n\n{fence}\n{log}\n{fence}" if question else log
