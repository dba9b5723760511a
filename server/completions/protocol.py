"""Request and response models of the completion routes (OpenAI shapes; unknown fields ignored)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4
# A seed fits int64 (vLLM checks the same); the bound is the largest double below 2**63, so
# that JSON tools reading numbers as doubles (schema validators) agree with it.
MAX_SEED = 2**63 - 1024


def well_formed(value: Any) -> Any:
    """Refuse text that is not Unicode, in a string or in the lists and dicts around it: JSON
    can spell a lone surrogate (`"\\ud800"`), which no tokenizer, database or UTF-8 body holds."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("invalid Unicode: a lone surrogate is not text") from None
    elif isinstance(value, list | tuple):
        for item in value:
            well_formed(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            well_formed(key)
            well_formed(item)
    return value


def _integral(value: Any) -> Any:
    """JSON Schema's integer: 2 and 2.0; strict validation refuses the rest (true, "2", 2.5)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# After an int's constraints in `Annotated[int, Field(...), Integral]`, so that the schema has them.
Integral = BeforeValidator(_integral)
NonEmpty = Annotated[str, Field(min_length=1)]


def _requires(field: str, minimum: int | None, needs: str) -> dict[str, Any]:
    """JSON Schema for a rule the model validators enforce: `field` given (as an object, or at
    least `minimum`) requires `needs` to be true."""
    given = {"type": "object"} if minimum is None else {"type": "integer", "minimum": minimum}
    return {"if": {"properties": {field: given}, "required": [field]},
            "then": {"properties": {needs: {"const": True}}, "required": [needs]}}


class RequestModel(BaseModel):
    """A request body: strict types (the schema's: `"n": "2"` or `"stream": 1` is a 400, not
    coerced) and every field checked with `well_formed` (400, with the field as param)."""

    model_config = ConfigDict(strict=True)

    @field_validator("*")
    @classmethod
    def _well_formed(cls, value: Any) -> Any:
        return well_formed(value)


class OpenAIModel(RequestModel):
    # Like vLLM: accept and ignore fields we do not implement (metadata, store, ...).
    model_config = ConfigDict(extra="allow")


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        for part in value if isinstance(value, list) else ():
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError("only text content parts are supported")
        return value

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class StreamOptions(RequestModel):
    include_usage: bool = False


class SamplingFields(OpenAIModel):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1), Integral] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: Annotated[int, Field(ge=1, le=MAX_N), Integral] = 1
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=-MAX_SEED, le=MAX_SEED), Integral] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _check_stream_options(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _requires("stream_options", None, "stream"), _requires("top_logprobs", 1, "logprobs")]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1), Integral] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), Integral] | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _requires("stream_options", None, "stream")]})

    # One prompt per request; `echo` and `suffix` are not supported (accepted only as no-ops).
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=5), Integral] | None = None
    echo: bool = Field(default=False, json_schema_extra={"const": False})
    suffix: Annotated[str, Field(max_length=0)] | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
