"""The exception a route raises to answer in OpenAI's error shape."""

from __future__ import annotations

from devops_cli.serve.api import error_body


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)
