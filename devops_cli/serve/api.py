"""The OpenAI request bodies `serve` accepts, checked whole before anything reaches the engine, and
OpenAI's error shape. Ranges are OpenAI's (and vLLM's where it extends them: top_k); a field OpenAI
accepts that this server cannot honour (n > 1, logprobs, penalties other than 0) is refused by name
with 400, never ignored. Unknown fields are refused (400, as OpenAI does). Floats must be finite."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

INT64 = 2**63
MAX_STOPS, MAX_STOP_CHARS = 16, 1000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)  # accepted; Qwen's templates render no names (nor does vLLM's use)
    reasoning_content: str | None = None  # an earlier answer's reasoning, as vLLM returns it

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value):
        if isinstance(value, list):
            kinds = {part.get("type") for part in value if isinstance(part, dict)} - {"text"}
            if kinds:
                raise Unsupported("content", f"only text content parts are supported, not {sorted(map(str, kinds))}")
        return value

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0 = off; above the vocabulary = off
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    n: int | None = Field(None, ge=1, le=128)
    user: str | None = Field(None, max_length=1024)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence is longer than {MAX_STOP_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _supported(self):
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if (self.n or 1) != 1:
            raise Unsupported("n", "only n=1 is supported (one choice per request); send n requests")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise Unsupported(name, f"{name} other than 0 is not supported by this server")
        if self.logprobs or self.top_logprobs:
            raise Unsupported("logprobs", "logprobs are not supported by this server")
        return self

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]


class ChatTemplateKwargs(Strict):
    enable_thinking: bool | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: ChatTemplateKwargs | None = None  # vLLM's: {"enable_thinking": false}


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: Literal[False] | None = None


class Unsupported(ValueError):
    """A valid OpenAI value this server does not honour: refused naming its field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse(model: type[BaseModel], raw: bytes) -> tuple[BaseModel | None, str, str | None]:
    """(request, "", None) or (None, message, param): the body parsed and checked in one pass (pydantic's
    JSON parser: UTF-8, nesting depth, NaN/Infinity and every field's range)."""
    try:
        return model.model_validate_json(raw), "", None
    except ValidationError as e:
        return (None, *validation_message(e.errors()))


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one line, and the field they name."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    error = (first.get("ctx") or {}).get("error")
    if isinstance(error, Unsupported):
        param = param or error.param
        return f"{param}: {error}", param
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '').removeprefix('Invalid JSON: ')}", None
    if first.get("type") in ("model_type", "model_attributes_type") and not loc:
        return "the request body must be a JSON object", None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param
