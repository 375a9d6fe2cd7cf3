"""One chat worker's runtime: builds prompts, runs requests on the engine, streams replies, follows swaps."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from personabot.core import events, keys
from personabot.core.errors import one_line
from personabot.core.events import Event
from personabot.core.gpu_share import drop_holder, gpu_host, mark_holder, read_lease, should_release
from personabot.core.redis_pool import sync_client
from personabot.core.schemas import ChatRequest, ChatResult
from personabot.core.settings import Settings
from personabot.core.store import Store
from personabot.core.streams import is_finished, stream_key
from personabot.training.model_source import resolve_model_dir
from personabot.training.registry import AdapterPathError, AdapterRegistry
from personabot.workers.chat_reply import CLAIM_TTL_S, Reply, claim_key
from personabot.workers.engine import AdapterRefusedError, Engine, EngineError
from personabot.workers.engine.kv_plan import MAX_ROWS, KvPlan, auto_rows, limit_gpu_memory

log = logging.getLogger(__name__)

SYNC_POLL_S = 1.0  # how often a worker checks its host's GPU lease and refreshes its holder entry
ADAPTER_SYNC_S = 10.0  # how often it compares its adapter with the store's active one
LOAD_HOLD_S = 600.0  # while the model loads, the worker counts as holding the GPU for up to this long


def gpu_memory() -> dict[str, int]:
    """Device-wide GPU memory in MB once this process uses CUDA; empty on CPU."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"gpu_memory_used_mb": (total - free) // 2**20, "gpu_memory_total_mb": total // 2**20}


def chat_rows(settings: Settings, model_dir: Path) -> KvPlan:
    """PERSONABOT_MAX_BATCH, or (0) the rows this host's GPU (within PERSONABOT_GPU_MEMORY_GIB) holds next to
    the model."""
    limit_gpu_memory(settings.gpu_memory_gib)
    if settings.max_batch:
        return KvPlan(settings.max_batch, f"{settings.max_batch} KV rows (PERSONABOT_MAX_BATCH)")
    return auto_rows(model_dir, device=settings.device, max_len=settings.context_tokens,
                     concurrent_training=not should_release(settings.gpu_share))


def default_engine(settings: Settings, *, model_dir: Path, load: bool = True) -> Engine:
    from personabot.workers.engine.scheduler import HFEngine, load_hf_model

    plan = chat_rows(settings, model_dir)
    return HFEngine(lambda: load_hf_model(str(model_dir), device=settings.device, dtype=settings.dtype),
                    model_name=settings.model, max_batch=plan.rows,
                    max_len=settings.context_tokens, lora_slots=settings.lora_slots,
                    lora_rank=settings.lora_max_rank, load=load, prefix_cache=settings.chat_prefix_cache,
                    prefix_rows=settings.chat_prefix_rows, spare_rows=settings.chat_prefix_spare_rows,
                    sizing=plan.text, prefill_chunk=settings.prefill_chunk)


class ChatRuntime:
    """Everything one chat worker process holds: engine, tokenizer, store, Redis, swap listener, GPU lease sync."""

    def __init__(self, settings: Settings, *, worker_name: str = "",
                 engine_factory: Callable[..., Engine] = default_engine) -> None:
        from transformers import AutoTokenizer

        self.settings = settings
        self.worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.host = gpu_host(settings.gpu_host)
        # One connection per reply thread at most (Celery's pool is max_batch threads) + listeners.
        self.client = sync_client(settings.effective_redis_url, concurrency=settings.max_batch or MAX_ROWS)
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
        stats = self.engine.stats()
        reuse = {key: int(stats.get(key, 0)) for key in ("kv_rows", "prefix_chats", "prefix_tokens", "prefill_chunk")}
        log.info("ready: %(kv_rows)d KV rows; KV reuse keeps up to %(prefix_chats)d finished chats "
                 "(%(prefix_tokens)d tokens); prompts prefilled %(prefill_chunk)d tokens per pass between decode "
                 "steps", reuse)
        if getattr(self.engine, "sizing", ""):
            log.info("ready: sized %s", self.engine.sizing)  # type: ignore[attr-defined]
        memory = gpu_memory()
        events.publish(self.client, events.WorkerOnline(
            worker=self.worker_name, kind="chat", model=self.settings.model, adapter=self.engine.active, host=self.host,
            gpu_memory_used_mb=memory.get("gpu_memory_used_mb"), gpu_memory_total_mb=memory.get("gpu_memory_total_mb"),
            kv_rows=reuse["kv_rows"], prefix_chats=reuse["prefix_chats"], prefix_tokens=reuse["prefix_tokens"]))
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
                events.publish(self.client, events.AdapterSwapped(worker=self.worker_name, version=None))
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
        events.publish(self.client, events.AdapterSwapped(worker=self.worker_name, version=version,
                                                          stall_ms=round(stall_ms, 2)))

    def _refused_event(self, version: str | None, reason: str) -> None:
        log.warning("adapter %s refused: %s", version, reason)
        events.publish(self.client, events.AdapterRefused(worker=self.worker_name, version=version, reason=reason,
                                                          serving=self.engine.active))

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
            # Serve again once the active adapter is loaded — and also when that fails (the
            # periodic sync with the store's active adapter retries it), never "updating" for good.
            try:
                self.sync_active()
            except Exception:
                log.exception("could not load the active adapter after reclaiming the GPU; retrying later")
            finally:
                self.updating_eta_s = None
            mark_holder(self.client, self.host, self.worker_name, "loaded")

    def handle_event(self, event: Event) -> None:
        typed = events.decode(event)
        if isinstance(typed, events.AdapterPromoted):
            self.swap(typed.version, typed.path, typed.base_model)
        elif isinstance(typed, events.GpuRelease) and typed.host in ("", self.host):
            self.release_gpu(typed.eta_s or 600)
        elif isinstance(typed, events.GpuReclaim) and typed.host in ("", self.host):
            if read_lease(self.client, self.host) is None:
                self.reclaim_gpu()

    def _handle_safely(self, event: Event) -> None:
        try:
            self.handle_event(event)
        except redis.RedisError:
            raise
        except Exception as error:
            log.exception("the %s event could not be handled; still listening", event.type)
            if event.type == events.AdapterPromoted.TYPE:
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
            return Reply(self, request, claim=(key, token)).run()
        finally:
            if self.client.get(key) == token.encode():
                self.client.delete(key)

    def publish_stats(self) -> None:
        self.client.hset(keys.CHAT_WORKERS, self.worker_name, json.dumps({**self.engine.stats(), **gpu_memory()}))


def _eta(lease: dict[str, object]) -> float:
    try:
        return float(lease.get("eta_s") or 600)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 600.0
