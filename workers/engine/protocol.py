"""The small Engine interface the chat worker talks to, and its request and stream types."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Protocol

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"
FINISH_UPDATING = "updating"  # the model is unloaded while training uses the GPU
ACTIVE = ":active:"  # GenerationRequest.adapter value: whatever adapter is active at submit time


class EngineError(RuntimeError):
    """The engine cannot serve a request; the message says why and what to do."""


class AdapterRefusedError(EngineError):
    """An adapter cannot be loaded (wrong base, bad files, unsupported rank/targets)."""


@dataclass
class GenerationRequest:
    """One prompt, already tokenized, with resolved sampling parameters."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    adapter: str | None = None  # an adapter version loaded in the engine; None = base model
    min_new_tokens: int = 0  # end-of-text is ignored before this many tokens (benchmarks force lengths)


@dataclass
class GenerationDone:
    """Why and when a generation ended."""

    finish_reason: str
    completion_tokens: int
    adapter: str | None
    error: str = ""


@dataclass
class GenerationStream:
    """Token ids as the engine produces them; the last item is a GenerationDone."""

    request: GenerationRequest
    items: queue.SimpleQueue[list[int] | GenerationDone] = field(default_factory=queue.SimpleQueue)
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    adapter: str | None = None  # resolved at submit: the version this request runs on
    lora_slot: int | None = None

    def next_batch(self, timeout: float | None = None) -> list[int] | GenerationDone:
        """Block for the next item, then merge every token list already waiting behind it."""
        item = self.items.get(timeout=timeout)
        if isinstance(item, GenerationDone):
            return item
        tokens = list(item)
        while True:
            try:
                more = self.items.get_nowait()
            except queue.Empty:
                return tokens
            if isinstance(more, GenerationDone):
                self.items.put(more)  # SimpleQueue keeps FIFO for one consumer
                return tokens
            tokens.extend(more)


class Engine(Protocol):
    """What the chat task needs from a backend (this repo: `workers.engine.scheduler.HFEngine`)."""

    model_name: str

    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queue a request; tokens arrive on the returned stream."""

    def cancel(self, request_id: str, reason: str = FINISH_CANCELLED) -> None:
        """Stop a request; its batch slot is freed at the next step."""

    def load_adapter(self, name: str, path: str, base_model: str = "") -> float:
        """Make an adapter version resident (AdapterRefusedError if it cannot be used); returns
        how long decoding stalled for it, in ms."""

    def set_active(self, name: str | None) -> None:
        """Make a resident adapter (or None = base) the one new 'active' requests get."""

    def has_adapter(self, name: str) -> bool:
        """Whether this adapter version is resident."""

    @property
    def active(self) -> str | None:
        """The adapter version new 'active' requests use (None = base model)."""

    def release(self) -> None:
        """Finish in-flight requests, then free the accelerator (the model is unloaded)."""

    def reclaim(self) -> None:
        """Load the model again after `release`."""

    @property
    def released(self) -> bool:
        """Whether the model is unloaded."""

    def stats(self) -> dict[str, int | float]:
        """Counters: decode steps, tokens, prefills, the largest batch seen, swaps."""

    def close(self) -> None:
        """Stop the decode loop and free everything."""
