"""Request and response models of the completion routes (OpenAI shapes; unknown fields ignored)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4
MAX_STOP_CHARS = 1024  # each stop string: stored with every answer (`completions.params`)
MAX_MESSAGES = 2048  # messages in one chat: each costs parsing and templating whatever its length
MAX_PROMPTS = 16  # prompts in one /v1/completions request, each answered n times
# What the schema cannot state of max_tokens: the served schema bounds it under the loaded model
# and the settings (server/completions/bounds.py), but not the share of several prompts.
MAX_TOKENS = ("The most tokens each choice may hold; an answer also ends where the model's "
              "context does (finish_reason `length`). Prompts x n x max_tokens may not pass "
              "FLYWHEEL_MAX_REQUEST_TOKENS (400 `request_too_costly`).")
# A seed fits int64 (vLLM checks the same). The bound is a double whose shortest decimal form is
# exact, so that JSON tools reading numbers as doubles and writing them back (schemathesis) agree
# with it: 2**63 - 1024, the largest double below 2**63, came back as 9223372036854775000, past it.
MAX_SEED = 9 * 10**18


def invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is ``message`` alone (a plain ``ValueError`` reads
    "Value error, ..."); the error handler puts the field's name before it."""
    return PydanticCustomError("value_error", message)


def well_formed(value: Any) -> Any:
    """Refuse text that is not Unicode, in a string or in the lists and dicts around it: JSON
    can spell a lone surrogate (`"\\ud800"`), which no tokenizer, database or UTF-8 body holds."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("invalid Unicode: a lone surrogate is not text") from None
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
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def _requires(field: str, minimum: int | None, needs: str) -> dict[str, Any]:
    """JSON Schema for a rule the model validators enforce: `field` given (as an object, or at
    least `minimum`) requires `needs` to be true."""
    given = {"type": "object"} if minimum is None else {"type": "integer", "minimum": minimum}
    return {"if": {"properties": {field: given}, "required": [field]},
            "then": {"properties": {needs: {"const": True}}, "required": [needs]}}


def _excludes(flag: str, other: str) -> dict[str, Any]:
    """JSON Schema for a rule the model validators enforce: `flag` true leaves `other` unset."""
    return {"if": {"properties": {flag: {"const": True}}, "required": [flag]},
            "then": {"properties": {other: {"type": "null"}}}}


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
                raise invalid("only text content parts are supported")
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
    max_tokens: Annotated[int, Field(ge=1), Integral] | None = Field(None, description=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: Annotated[int, Field(ge=1, le=MAX_N), Integral] = 1
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=-MAX_SEED, le=MAX_SEED), Integral] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)

    # Rules across fields are field validators of the later field (``info.data`` holds the
    # earlier ones), so that the error names it as its param, as vLLM's does.
    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, value: StreamOptions | None,
                              info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise invalid("only allowed when stream is true")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _requires("stream_options", None, "stream"), _requires("top_logprobs", 1, "logprobs")]})

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Annotated[int, Field(ge=1), Integral] | None = Field(
        None, description=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), Integral] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _check_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise invalid("requires logprobs to be true")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


MAX_TOKEN_ID = 2**31 - 1  # int32, as the engines hold token ids; the vocabulary is checked later
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID), Integral]],
                     Field(min_length=1)]


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _requires("stream_options", None, "stream"), _excludes("echo", "logprobs")]})

    # OpenAI's four forms: a text, texts, token ids, lists of token ids. Each prompt gets `n`
    # choices, indexed prompt by prompt (choice j of prompt i is index i * n + j).
    prompt: (NonEmpty | TokenIds
             | Annotated[list[NonEmpty], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    logprobs: Annotated[int, Field(ge=0, le=5), Integral] | None = None
    echo: bool = False  # the answer's text starts with the prompt's
    suffix: Annotated[str, Field(max_length=0)] | None = None

    @field_validator("echo")
    @classmethod
    def _check_echo(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("logprobs") is not None:
            raise invalid("cannot be combined with logprobs: prompt logprobs are not computed")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
