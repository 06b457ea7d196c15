"""The OpenAI request bodies `serve` accepts, checked whole before anything reaches the engine, and
OpenAI's error shape. Ranges are OpenAI's (and vLLM's where it extends them: top_k); a field OpenAI
accepts that this server cannot honour (n > 1, logprobs, penalties other than 0) is refused by name
with 400, never ignored. Unknown fields are refused (400, as OpenAI does). Floats must be finite.
Tools: OpenAI function tools (schemas checked by tools.tool_problems), tool_choice none | auto | required |
a named function among them, parallel_tool_calls; a tool message must answer a call of the assistant
message before it (its tool_call_id)."""

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


class FunctionCall(Strict):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1 << 20)  # the JSON of the arguments, as OpenAI returns them


class ToolCall(Strict):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None  # what a client rebuilt from streamed deltas may still carry


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)  # accepted; Qwen's templates render no names (nor does vLLM's use)
    reasoning_content: str | None = None  # an earlier answer's reasoning, as vLLM returns it
    tool_calls: list[ToolCall] | None = None  # an earlier answer's calls (assistant)
    tool_call_id: str | None = Field(None, max_length=256)  # the call a tool result answers (role tool)

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
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise Invalid("tool_call_id", "a tool message needs the tool_call_id of the call it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry a tool_call_id")
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


class ChosenFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: ChosenFunction


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: ChatTemplateKwargs | None = None  # vLLM's: {"enable_thinking": false}
    tools: list | None = Field(None, max_length=128)  # OpenAI function tools, checked by tools.tool_problems
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice(cls, value):
        if value is not None and not isinstance(value, dict) and value not in ("none", "auto", "required"):
            raise ValueError(f"must be 'none', 'auto', 'required' or {{\"type\": \"function\", \"function\": "
                             f"{{\"name\": ...}}}}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _tools(self):
        from devops_cli.tools import tool_problems

        problems = tool_problems(self.tools or [])
        if problems:
            raise Invalid(*problems[0])
        known = {t["function"]["name"] for t in self.tools or []}
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in known:
            raise Invalid("tool_choice", f"names the function '{choice.function.name}', which is not among the tools "
                          f"({', '.join(sorted(known)) or 'none given'})")
        if choice == "required" and not known:
            raise Invalid("tool_choice", "'required' needs tools to call; send tools")
        calls: set[str] = set()  # the ids of the calls a tool message may answer
        for i, m in enumerate(self.messages):
            if m.role == "tool":
                if m.tool_call_id not in calls:
                    raise Invalid(f"messages.{i}.tool_call_id",
                                  f"'{m.tool_call_id}' answers no tool call of the assistant message before it"
                                  if calls else "a tool message must follow an assistant message with tool_calls")
            else:
                calls = {c.id for c in m.tool_calls or []}
        return self

    def choice(self) -> str | None:
        """'none' | 'auto' | 'required' | a function's name (tools given), or None (no tools in play)."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: Literal[False] | None = None


class Invalid(ValueError):
    """A value refused naming its field (a path such as tools[0].function.name)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class Unsupported(Invalid):
    """A valid OpenAI value this server does not honour: refused naming its field."""


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
    if isinstance(error, Invalid):  # an Unsupported value is named by its field; an Invalid one by its path in it
        param = (param or error.param) if isinstance(error, Unsupported) else ".".join(filter(None, [param, error.param]))
        return f"{param}: {error}", param
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '').removeprefix('Invalid JSON: ')}", None
    if first.get("type") in ("model_type", "model_attributes_type") and not loc:
        return "the request body must be a JSON object", None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param
