"""One chat worker's runtime: builds prompts, runs requests on the engine, streams replies, follows swaps."""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from core import events
from core.prompting import PromptError, conversation_messages, system_prompt_for
from core.schemas import ChatRequest, ChatResult, Event
from core.settings import Settings
from core.store import Store
from core.streams import ReplyStreamWriter, cancel_key, is_finished, stream_key
from training.gpu_share import drop_holder, gpu_host, mark_holder, read_lease
from training.model_source import resolve_model_dir
from training.registry import AdapterPathError, AdapterRegistry
from workers.engine import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_STOP,
    AdapterRefusedError,
    Engine,
    EngineError,
    GenerationDone,
    GenerationRequest,
    GenerationStream,
)
from workers.hf_engine import ACTIVE

log = logging.getLogger(__name__)

STATS_KEY = "personabot:chat-workers"
CANCEL_POLL_S = 0.2
FLUSH_S = 0.03  # tokens produced within this long go out as one stream entry (fewer XADDs, less GIL)
CLAIM_TTL_S = 10  # a reply's owner refreshes its claim; a dead owner's claim lapses this fast
SYNC_POLL_S = 1.0  # how often a worker checks its host's GPU lease and refreshes its holder entry
ADAPTER_SYNC_S = 10.0  # how often it compares its adapter with the store's active one
LOAD_HOLD_S = 600.0  # while the model loads, the worker counts as holding the GPU for up to this long


def claim_key(request_id: str) -> str:
    return f"personabot:claim:{request_id}"


def updating_text(eta_s: float) -> str:
    minutes = max(1, round(eta_s / 60))
    return f"I'm being updated, back in about {minutes} minute{'s' if minutes != 1 else ''}."


def gpu_memory() -> dict[str, int]:
    """Device-wide GPU memory in MB once this process uses CUDA; empty on CPU."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"gpu_memory_used_mb": (total - free) // 2**20, "gpu_memory_total_mb": total // 2**20}


def default_engine(settings: Settings, *, model_dir: Path, load: bool = True) -> Engine:
    from workers.hf_engine import HFEngine, load_hf_model

    return HFEngine(lambda: load_hf_model(str(model_dir), device=settings.device, dtype=settings.dtype),
                    model_name=settings.model, max_batch=settings.max_batch,
                    max_len=settings.context_tokens, lora_slots=settings.lora_slots,
                    lora_rank=settings.lora_max_rank, load=load)


class ChatRuntime:
    """Everything one chat worker process holds: engine, tokenizer, store, Redis, swap listener, GPU lease sync."""

    def __init__(self, settings: Settings, *, worker_name: str = "",
                 engine_factory: Callable[..., Engine] = default_engine) -> None:
        from transformers import AutoTokenizer

        self.settings = settings
        self.worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.host = gpu_host(settings.gpu_host)
        self.client = redis.Redis.from_url(settings.effective_redis_url)
        self.store = Store(settings.db_url)
        self.registry = AdapterRegistry(self.store, settings.adapters_path)
        self._lock = threading.RLock()
        self._refused: set[str] = set()
        self._last_error = ""
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="swap-listener", daemon=True)
        self._syncer = threading.Thread(target=self._sync_loop, name="gpu-adapter-sync", daemon=True)
        try:
            self.model_dir = resolve_model_dir(settings)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self._tokenizer_lock = threading.Lock()
            # A worker that starts while training holds this host's GPU stays unloaded until the lease ends.
            lease = read_lease(self.client, self.host)
            self.updating_eta_s: float | None = None if lease is None else _eta(lease)
            if lease is None:
                mark_holder(self.client, self.host, self.worker_name, "loaded", LOAD_HOLD_S)
            self.engine = engine_factory(settings, model_dir=self.model_dir, load=lease is None)
        except BaseException:
            self._drop_connections()
            raise

    def start(self, timeout_s: float = 120.0) -> ChatRuntime:
        """Subscribe to events, then load the store's active adapter; returns once that is done."""
        self._listener.start()
        deadline = time.monotonic() + timeout_s
        while not self._synced.wait(0.1):
            if self._last_error or time.monotonic() >= deadline:
                raise EngineError(f"the chat worker could not subscribe to events and load the active "
                                  f"adapter: {self._last_error or f'no answer within {timeout_s:.0f}s'}; "
                                  "check PERSONABOT_REDIS_URL, PERSONABOT_DATABASE_URL and the worker log")
        self._syncer.start()
        events.publish(self.client, "worker.online", worker=self.worker_name, kind="chat",
                       model=self.settings.model, adapter=self.engine.active, host=self.host, **gpu_memory())
        return self

    def close(self) -> None:
        self._stop.set()
        for thread in (self._listener, self._syncer):
            if thread.is_alive():
                thread.join(timeout=5)
        self.engine.close()
        self._drop_connections()

    def _drop_connections(self) -> None:
        try:
            drop_holder(self.client, self.host, self.worker_name)
        except redis.RedisError as error:
            log.warning("cannot remove this worker's GPU holder entry (%s); it lapses by itself", error)
        self.store.close()
        self.client.close()

    # --- adapters -------------------------------------------------------------------------------
    def adapter_dir(self, version: str, stored: str = "") -> Path:
        """A version's files in this worker's adapter store: by name, else by its stored path (relative,
        or a legacy absolute one inside the store). Anything outside the store raises AdapterPathError."""
        by_name = self.registry.resolve_path(version)
        if by_name.is_dir() or not stored:
            return by_name
        return self.registry.resolve_path(stored)

    def sync_active(self) -> None:
        """Make the engine serve whatever the store says is active (a worker that starts later)."""
        with self._lock:
            if self.engine.released:
                return
            active = self.store.active_adapter()
            if active is None:
                self.engine.set_active(None)
                return
            self.swap(active.name, active.path, active.base_model)

    def check_active(self) -> None:
        """Catch up with the store when an adapter.promoted event was lost (Redis failed after the commit)."""
        if self.engine.released:
            return
        active = self.store.active_adapter()
        name = active.name if active is not None else None
        if name != self.engine.active and name not in self._refused:
            log.warning("serving %s but the store's active adapter is %s; syncing", self.engine.active, name)
            self.sync_active()

    def swap(self, version: str | None, path: str, base_model: str) -> None:
        """Load a version next to the current one, then point new requests at it."""
        with self._lock:
            if self.engine.released:
                log.info("adapter %s noted while the GPU is released; loaded on reclaim", version)
                return
            if version is None:
                self.engine.set_active(None)
                events.publish(self.client, "adapter.swapped", worker=self.worker_name, version=None,
                               stall_ms=0.0)
                return
            try:
                stall_ms = self.engine.load_adapter(version, str(self.adapter_dir(version, path)), base_model)
                self.engine.set_active(version)
            except (AdapterPathError, EngineError) as error:
                if isinstance(error, (AdapterPathError, AdapterRefusedError)):
                    self._refused.add(version)
                self._refused_event(version, str(error))
                return
            self._refused.discard(version)
        log.info("adapter %s active (decode stalled %.1f ms)", version, stall_ms)
        events.publish(self.client, "adapter.swapped", worker=self.worker_name, version=version,
                       stall_ms=round(stall_ms, 2))

    def _refused_event(self, version: str | None, reason: str) -> None:
        log.warning("adapter %s refused: %s", version, reason)
        events.publish(self.client, "adapter.refused", worker=self.worker_name, version=version,
                       reason=reason, serving=self.engine.active)

    # --- GPU sharing ----------------------------------------------------------------------------
    def release_gpu(self, eta_s: float) -> None:
        """Finish running replies, unload the model, then tell the trainer (holder entry "released")."""
        with self._lock:
            self.updating_eta_s = eta_s
            if not self.engine.released:
                log.info("releasing the GPU for training (eta %.0f s)", eta_s)
                self.engine.release()
            mark_holder(self.client, self.host, self.worker_name, "released")

    def reclaim_gpu(self) -> None:
        """Load the model again and the store's active adapter; replies answer "updating" until done."""
        with self._lock:
            if self.engine.released:
                log.info("reclaiming the GPU")
                mark_holder(self.client, self.host, self.worker_name, "loaded", LOAD_HOLD_S)
                self.engine.reclaim()
            self.sync_active()
            self.updating_eta_s = None
            mark_holder(self.client, self.host, self.worker_name, "loaded")

    def handle_event(self, event: Event) -> None:
        data = event.data
        if event.type == "adapter.promoted":
            self.swap(data.get("version"), str(data.get("path") or ""), str(data.get("base_model") or ""))
        elif event.type in ("gpu.release", "gpu.reclaim") and data.get("host") in (None, "", self.host):
            if event.type == "gpu.release":
                self.release_gpu(float(data.get("eta_s") or 600))
            elif read_lease(self.client, self.host) is None:
                self.reclaim_gpu()

    def _handle_safely(self, event: Event) -> None:
        try:
            self.handle_event(event)
        except redis.RedisError:
            raise
        except Exception as error:
            log.exception("the %s event could not be handled; still listening", event.type)
            if event.type == "adapter.promoted":
                self._refused_event(str(event.data.get("version")), one_line(error))

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                subscription = events.subscribe(self.client, timeout=0.5)
                next(subscription)  # subscribed once the first poll returns
                self.sync_active()
                self._synced.set()
                for event in subscription:
                    if self._stop.is_set():
                        return
                    if event is not None:
                        self._handle_safely(event)
            except Exception as error:
                self._last_error = one_line(error)
                log.warning("event listener failed (%s); reconnecting", self._last_error)
                self._stop.wait(1.0)

    def _sync_loop(self) -> None:
        """Follow this host's GPU lease (also when events were missed or the trainer died) and the store."""
        next_adapter_check = time.monotonic() + ADAPTER_SYNC_S
        while not self._stop.wait(SYNC_POLL_S):
            try:
                lease = read_lease(self.client, self.host)
                if lease is not None and not self.engine.released:
                    self.release_gpu(_eta(lease))
                elif lease is None and self.engine.released:
                    self.reclaim_gpu()
                else:
                    mark_holder(self.client, self.host, self.worker_name,
                                "released" if self.engine.released else "loaded")
                if time.monotonic() >= next_adapter_check:
                    next_adapter_check = time.monotonic() + ADAPTER_SYNC_S
                    self.check_active()
            except Exception as error:
                log.warning("GPU lease / adapter sync failed (%s); retrying", one_line(error))

    # --- requests -------------------------------------------------------------------------------
    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.encode(messages))

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                           tokenize=True, return_dict=False))

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def serve(self, request: ChatRequest) -> ChatResult:
        """Answer one request into its reply stream, exactly once.

        A request already answered is not run again. A duplicate delivery while another thread or
        worker holds the request's claim waits: for that final record, or for the claim to lapse
        (its owner died), in which case this delivery answers it.
        """
        key, token = claim_key(request.request_id), f"{self.worker_name}:{threading.get_ident()}"
        while True:
            if is_finished(self.client, request.request_id):
                last = self.client.xrevrange(stream_key(request.request_id), count=1)
                return ChatResult.model_validate_json(last[0][1][b"r"])
            if self.client.set(key, token, nx=True, ex=CLAIM_TTL_S):
                break
            time.sleep(0.5)
        try:
            return _Reply(self, request, claim=(key, token)).run()
        finally:
            if self.client.get(key) == token.encode():
                self.client.delete(key)

    def publish_stats(self) -> None:
        self.client.hset(STATS_KEY, self.worker_name, json.dumps({**self.engine.stats(), **gpu_memory()}))


def one_line(error: BaseException) -> str:
    """`Type: first line of the message` (database errors carry their SQL on further lines)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'no detail'}"


def _eta(lease: dict[str, object]) -> float:
    try:
        return float(lease.get("eta_s") or 600)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 600.0


class _Reply:
    """One request from prompt to final record."""

    def __init__(self, runtime: ChatRuntime, request: ChatRequest, *, claim: tuple[str, str]) -> None:
        self.rt = runtime
        self.claim = claim
        self.request = request
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.writer = ReplyStreamWriter(runtime.client, request.request_id, runtime.settings.stream_ttl_s)

    def final(self, text: str, finish_reason: str, adapter: str | None, *, error: str = "",
              prompt_tokens: int = 0, completion_tokens: int = 0, first_token_s: float = 0.0) -> ChatResult:
        result = ChatResult(
            request_id=self.request.request_id, text=text, finish_reason=finish_reason,  # type: ignore[arg-type]
            adapter_version=adapter, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            queued_s=max(0.0, self.started - self.request.created_at), first_token_s=first_token_s,
            total_s=time.time() - self.started, worker=self.rt.worker_name, error=error)
        self.writer.final(result)
        return result

    def run(self) -> ChatResult:
        """Answer the request; any failure still ends the stream with a final record naming it."""
        try:
            return self._run()
        except Exception as error:
            log.exception("reply %s failed", self.request.request_id)
            self.rt.engine.cancel(self.request.request_id, FINISH_ERROR)
            return self.final("", FINISH_ERROR, None,
                              error=f"the chat worker failed: {one_line(error)}; see the worker log")

    def _run(self) -> ChatResult:
        rt, request, settings = self.rt, self.request, self.rt.settings
        self.writer.reset()
        if rt.updating_eta_s is not None or rt.engine.released:
            return self.final(updating_text(rt.updating_eta_s or 600), FINISH_STOP, None, error="updating")
        if rt.client.exists(cancel_key(request.request_id)):
            return self.final("", FINISH_CANCELLED, None)
        sampling = request.sampling
        # An explicit max_new_tokens is honoured strictly; the default never takes more than half the context.
        max_new = sampling.max_new_tokens or min(settings.max_new_tokens, settings.context_tokens // 2)
        budget = settings.context_tokens - max_new
        try:
            if budget < 1:
                raise PromptError(f"max_new_tokens {max_new} leaves no room for the prompt in "
                                  f"{settings.context_tokens} context tokens; lower max_new_tokens")
            system = system_prompt_for(rt.store.get_persona(), request.system_prompt)
            messages = conversation_messages(system, request.messages, count_tokens=rt.count_tokens,
                                             budget=budget)
            prompt_ids = rt.encode(messages)
            adapter = self.resolve_adapter()
        except (PromptError, EngineError) as error:
            return self.final("", FINISH_ERROR, None, error=str(error))
        temperature = settings.temperature if sampling.temperature is None else sampling.temperature
        generation = GenerationRequest(
            request_id=request.request_id, prompt_ids=prompt_ids, max_new_tokens=max_new,
            temperature=temperature, top_p=sampling.top_p or settings.top_p,
            repetition_penalty=sampling.repetition_penalty or settings.repetition_penalty,
            seed=sampling.seed, adapter=adapter, min_new_tokens=sampling.min_new_tokens)
        try:
            stream = rt.engine.submit(generation)
        except EngineError as error:
            if rt.engine.released:
                return self.final(updating_text(rt.updating_eta_s or 600), FINISH_STOP, None, error="updating")
            return self.final("", FINISH_ERROR, None, error=str(error), prompt_tokens=len(prompt_ids))
        return self.stream_tokens(stream, len(prompt_ids))

    def resolve_adapter(self) -> str | None:
        name = self.request.adapter
        if name == "active":
            return ACTIVE
        if name == "base":
            return None
        if not self.rt.engine.has_adapter(name):
            version = self.rt.store.find_adapter(name)
            if version is None:
                raise EngineError(f"adapter version {name!r} does not exist; pick one listed in the "
                                  "Adapters tab, 'active' or 'base'")
            try:
                folder = self.rt.adapter_dir(name, version.path)
            except AdapterPathError as error:
                raise EngineError(f"adapter version {name!r} cannot be used: {error}") from None
            self.rt.engine.load_adapter(name, str(folder), version.base_model)
        return name

    def stream_tokens(self, stream: GenerationStream, prompt_tokens: int) -> ChatResult:
        rt, request_id = self.rt, self.request.request_id
        stops = [s for s in self.request.sampling.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        ids: list[int] = []
        text, sent = "", ""
        stopped_at: int | None = None
        next_cancel_check = time.monotonic() + CANCEL_POLL_S
        while True:
            try:
                item = stream.next_batch(timeout=CANCEL_POLL_S)
            except queue.Empty:
                item = []
            if isinstance(item, GenerationDone):
                done = item
                break
            if item and stopped_at is None:
                ids.extend(item)
                text = rt.decode(ids)
                for stop in stops:
                    index = text.find(stop, max(0, len(sent) - len(stop)))
                    if index >= 0 and (stopped_at is None or index < stopped_at):
                        stopped_at = index
                if stopped_at is not None:
                    text = text[:stopped_at]
                    rt.engine.cancel(request_id, FINISH_STOP)
                ready = text if stopped_at is not None else text[:len(text) - hold] if hold else text
                if ready.endswith("\ufffd"):
                    ready = ready.rstrip("\ufffd")
                if len(ready) > len(sent) and ready.startswith(sent):
                    self.writer.token(ready[len(sent):])
                    sent = ready
                    time.sleep(FLUSH_S)
            if time.monotonic() >= next_cancel_check:
                next_cancel_check = time.monotonic() + CANCEL_POLL_S
                pipe = rt.client.pipeline()
                pipe.exists(cancel_key(request_id))
                pipe.expire(self.claim[0], CLAIM_TTL_S)
                if pipe.execute()[0]:
                    rt.engine.cancel(request_id, FINISH_CANCELLED)
        if stopped_at is None and ids:
            text = rt.decode(ids)
        if text.startswith(sent) and len(text) > len(sent):
            self.writer.token(text[len(sent):])
        first = (stream.first_token_at - self.started_mono) if stream.first_token_at else 0.0
        reason = FINISH_STOP if stopped_at is not None else done.finish_reason
        result = self.final(text, reason, done.adapter, error=done.error, prompt_tokens=prompt_tokens,
                            completion_tokens=len(ids), first_token_s=first)
        rt.publish_stats()
        return result
