"""The /v1/chat/completions request as OpenAI defines it, checked, and turned into a ChatRequest."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from personabot.api.errors import APIError, validation_error
from personabot.core.schemas import Message

# Parameters OpenAI defines that this server does not implement: any non-empty value is refused (400).
UNSUPPORTED = {
    "tools": "tool calling is not supported by the persona; omit tools",
    "tool_choice": "tool calling is not supported by the persona; omit tool_choice",
    "functions": "function calling is not supported; omit functions",
    "function_call": "function calling is not supported; omit function_call",
    "response_format": "structured output is not supported; omit response_format",
    "logit_bias": "logit_bias is not supported; omit it",
    "audio": "audio output is not supported; omit audio",
    "prediction": "predicted outputs are not supported; omit prediction",
}
ROLES = {"system", "developer", "user", "assistant"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionBody(BaseModel):
    """The fields this server honours; other OpenAI fields are checked by `refuse_unsupported`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    user: str | None = Field(None, max_length=256)
    # Extensions with vLLM's names (send them through the openai client's `extra_body`).
    min_tokens: int = Field(0, ge=0, le=8192, description="End-of-text is ignored before this many tokens.")
    repetition_penalty: float | None = Field(None, ge=1, le=2, description="1 = off; default: the persona's.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check_lengths(self) -> None:
        """min_tokens may not exceed the reply's length cap."""
        if self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise APIError(400, f"min_tokens={self.min_tokens} is more than max_tokens={self.max_new_tokens}; "
                           "lower min_tokens or raise max_tokens", param="min_tokens", code="invalid_value")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def parse_body(raw: Any) -> ChatCompletionBody:
    """Validate a request body; a 400 names the first bad field."""
    if not isinstance(raw, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        body = ChatCompletionBody.model_validate(raw)
    except ValidationError as error:
        raise validation_error(list(error.errors())) from None
    refuse_unsupported(body)
    body.check_lengths()
    return body


def refuse_unsupported(body: ChatCompletionBody) -> None:
    """Parameters the engine does not honour are refused, never silently ignored."""
    extra = body.model_extra or {}
    # e.g. tool_choice "none", response_format text
    harmless: tuple[Any, ...] = (None, [], {}, "none", {"type": "text"})
    for name, why in UNSUPPORTED.items():
        if extra.get(name) not in harmless:
            raise APIError(400, why, param=name, code="unsupported_parameter")
    if body.n not in (None, 1):
        raise APIError(400, f"n={body.n}: only one choice per request is served; send n=1 or omit it", param="n",
                       code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise APIError(400, f"{name} is not supported by the sampler (it applies the persona's repetition "
                           "penalty); send 0 or omit it", param=name, code="unsupported_parameter")
    if body.logprobs or body.top_logprobs:
        param = "logprobs" if body.logprobs else "top_logprobs"
        raise APIError(400, "logprobs are not returned by this server; omit logprobs/top_logprobs", param=param,
                       code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")


def content_text(content: Any, index: int) -> str:
    """A message's text: a string, or a list of text parts (other part types are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for number, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported (no images, audio or files)",
                               param=f"messages[{index}].content[{number}]", code="unsupported_value")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, "content must be a string or a list of text parts", param=f"messages[{index}].content")


def split_messages(body: ChatCompletionBody) -> tuple[list[str], list[Message]]:
    """(client system texts, the conversation) with every message checked."""
    systems: list[str] = []
    turns: list[Message] = []
    for index, message in enumerate(body.messages):
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"role {role!r} is not supported; use system, developer, user or assistant "
                           "(tool messages need tool calling, which is not served)", param=f"messages[{index}].role")
        if message.get("tool_calls") or message.get("function_call"):
            raise APIError(400, "tool calls are not supported", param=f"messages[{index}].tool_calls")
        text = content_text(message.get("content"), index) if message.get("content") is not None else ""
        if role in ("system", "developer"):
            if turns:
                raise APIError(400, "system messages must come before the conversation",
                               param=f"messages[{index}].role")
            systems.append(text)
        else:
            turns.append(Message(role=role, content=text))
    if not turns or turns[-1].role != "user" or not turns[-1].content.strip():
        raise APIError(400, "the conversation must end with a non-empty user message",
                       param=f"messages[{len(body.messages) - 1}]")
    return systems, turns


Policy = Literal["append", "refuse", "replace"]


def system_override(policy: Policy, persona_prompt: str, systems: list[str]) -> str | None:
    """The system prompt to send (None = the persona's own) under PERSONABOT_API_SYSTEM_MESSAGES."""
    if not systems:
        return None
    if policy == "refuse":
        raise APIError(400, "system messages are refused: the persona's system prompt always comes first "
                       "(an operator may set PERSONABOT_API_SYSTEM_MESSAGES=append or replace)",
                       param="messages[0].role", code="system_message_refused")
    client = "\n\n".join(text for text in systems if text.strip())
    if policy == "replace":
        return client
    return f"{persona_prompt}\n\n{client}" if client else None
