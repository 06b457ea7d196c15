"""Errors the user can fix. The CLI turns each into one red line on stderr and exit code 2."""

from __future__ import annotations


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
