"""Shared message shapes: chat requests and replies, and the events every part publishes."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    role: Role
    content: str


class SamplingParams(BaseModel):
    """Per-request sampling; None means the persona/settings default."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: int | None = Field(None, ge=1, le=8192)
    repetition_penalty: float | None = Field(None, ge=1, le=2)
    min_new_tokens: int = Field(0, ge=0, le=8192, description="End-of-text is ignored before this many tokens.")
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None


class ChatRequest(BaseModel):
    """What the bot, the admin playground or an API enqueues on the `chat` queue (as JSON)."""

    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    messages: list[Message]
    # "active" = the active adapter; "base" = the base model alone; else an adapter version name.
    adapter: str = "active"
    system_prompt: str | None = None  # None = the persona's system prompt
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    chat_id: str = ""
    source: str = "api"
    created_at: float = Field(default_factory=time.time)


# "updating": the worker lent its GPU to training; the text says when it is back (no answer).
FinishReason = Literal["stop", "length", "cancelled", "error", "updating"]


class ChatResult(BaseModel):
    """The final record of one reply, written as the last entry of its reply stream."""

    request_id: str
    text: str
    finish_reason: FinishReason
    adapter_version: str | None  # None = base model
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queued_s: float = 0.0
    first_token_s: float = 0.0
    total_s: float = 0.0
    worker: str = ""
    error: str = ""
