"""Errors the user can fix. The CLI turns each into one red line on stderr and exit code 2."""

from __future__ import annotations

import difflib


class DevopsError(Exception):
    """A problem with the user's input: what is wrong, where, and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, where: str | None = None, hint: str | None = None):
        self.message, self.where, self.hint = message, where, hint
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text} — {self.hint}" if self.hint else text


class DevopsErrors(DevopsError):
    """Several problems found at once (a recipe is checked whole before anything runs)."""

    def __init__(self, errors: list[DevopsError]):
        self.errors = errors
        super().__init__("\n".join(e.line() for e in errors))

    def line(self) -> str:
        return "\n".join(e.line() for e in self.errors)


class SelfCheckError(DevopsError):
    """A library's result failed devops-model's own check of it (a library release that behaves
    differently, not the user's input): one line, exit code 1, nothing written."""

    exit_code = 1


class Diverged(DevopsError):
    """Training reached a non-finite loss or gradient norm: stopped at that step, nothing saved as the
    final model (earlier checkpoints are kept). One line, exit code 3."""

    exit_code = 3


def first_line(e: BaseException) -> str:
    """An exception's first non-empty line, or its type's name when its message is empty."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def did_you_mean(word: str, options, quote: str = "'") -> str | None:
    """'did you mean 'x'?' for the closest of `options` (difflib, cutoff 0.6), or None."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"did you mean {quote}{close[0]}{quote}?" if close else None


def collect(errors: list, fn, *args, default=None):
    """fn(*args), with its DevopsError(s) added to `errors` instead of raised (every problem at once)."""
    try:
        return fn(*args)
    except DevopsErrors as e:
        errors += e.errors
    except DevopsError as e:
        errors.append(e)
    return default
