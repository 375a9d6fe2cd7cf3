"""The chat worker's engine: one Qwen2 model, resident LoRA adapters, continuous batching."""

from __future__ import annotations

import collections
import gc
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from personabot.workers.engine.adapter_files import read_adapter, same_base
from personabot.workers.engine.chunking import chunk_shares
from personabot.workers.engine.layout import MIXED, LoraMode, bucket_of
from personabot.workers.engine.merge_policy import MergePolicy
from personabot.workers.engine.prefix_cache import Plan, PrefixPool
from personabot.workers.engine.protocol import (
    ACTIVE,
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    AdapterRefusedError,
    EngineError,
    GenerationDone,
    GenerationRequest,
    GenerationStream,
)
from personabot.workers.engine.qwen2 import Qwen2Decoder
from personabot.workers.engine.sampling import RowSampler
from personabot.workers.engine.slots import AdapterSlots

log = logging.getLogger(__name__)

COUNTERS = ("prefills", "prefill_passes", "prefill_chunks", "prefill_tokens", "prefix_hit_tokens", "prefix_copies",
            "decode_steps", "steps_between_chunks", "decode_rows", "tokens", "max_batch_seen", "finished",
            "adapter_loads", "swaps", "merges", "merge_ms_max")


def load_hf_model(path: str, *, device: str = "auto", dtype: str = "auto") -> Any:
    """Load a Qwen2 causal LM for serving (bf16 on GPU, fp32 on CPU unless told otherwise)."""
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), device_map=device)
    if model.config.model_type != "qwen2":
        raise EngineError(f"{path} is a {model.config.model_type} model; the chat worker serves qwen2 models")
    return model.eval()


@dataclass
class _Row:
    stream: GenerationStream
    lora_slot: int | None
    adapter: str | None
    key: Hashable  # the weights its KV is computed under (see AdapterSlots.key)
    ids: list[int]  # prompt + every token fed back; KV is written for ids[:position]
    order: int  # admission order (the prefill budget is shared oldest first)
    generated: int = 0
    position: int = 0
    decoding: bool = False  # the whole prompt is in and the first token was sampled


class HFEngine:
    """Implements `workers.engine.Engine` over `Qwen2Decoder` with a background decode loop."""

    def __init__(self, loader: Callable[[], Any], *, model_name: str, max_batch: int, max_len: int,
                 lora_slots: int = 3, lora_rank: int = 32, eos_ids: tuple[int, ...] = (),
                 load: bool = True, merge: bool | None = None, fuse: bool | None = None,
                 prefix_cache: bool = True, prefix_rows: int = 0, spare_rows: int = 0, sizing: str = "",
                 prefill_chunk: int = 512) -> None:
        """`load=False` starts released: nothing is loaded until `reclaim` (the GPU is lent to training).
        `merge` / `fuse`: see Qwen2Decoder (None = automatic). `prefix_cache`: keep finished requests'
        KV for reuse (see prefix_cache.py), at most `prefix_rows` rows (0 = every row not running),
        `spare_rows` KV rows beyond `max_batch` that only hold parked KV. `sizing`: how `max_batch` was
        chosen (workers.engine.kv_plan), for the worker's ready log (see `sizing`). `prefill_chunk`: prompt tokens
        computed between two decode steps, shared fairly by the prompts in prefill (see `_prefill`)."""
        if prefill_chunk < 1:
            raise EngineError(f"prefill_chunk is {prefill_chunk}; it must be at least 1 token "
                              "(PERSONABOT_PREFILL_CHUNK)")
        self._kv_sizing = sizing
        self.prefill_chunk = prefill_chunk
        self._order = itertools.count()
        self.pool = PrefixPool(max_batch, spare_rows if prefix_cache else 0, enabled=prefix_cache,
                               max_rows=prefix_rows)
        self._merge, self._fuse = merge, fuse
        self._merge_policy = MergePolicy()
        self.model_name = model_name
        self._loader = loader
        self.max_batch, self.max_len = max_batch, max_len
        self.lora_slots, self.lora_rank = lora_slots, lora_rank
        self._extra_eos = set(eos_ids)
        self._cv = threading.Condition()
        self._waiting: collections.deque[GenerationStream] = collections.deque()
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self._cancels: dict[str, str] = {}
        self._rows: list[_Row | None] = [None] * max_batch
        self.slots = AdapterSlots(lora_slots)
        self._active: str | None = None
        self._releasing = False
        self._stop = False
        self._counters: dict[str, int | float] = dict.fromkeys(COUNTERS, 0)
        self.eos_ids: set[int] = set(self._extra_eos)
        self.decoder: Qwen2Decoder | None = None
        self.sampler: RowSampler | None = None
        if load:
            self._build()
        else:
            self._releasing = True
        self._thread = threading.Thread(target=self._run, name="engine-decode", daemon=True)
        self._thread.start()

    # --- lifecycle ------------------------------------------------------------------------------
    def _build(self) -> None:
        # Each start-up stage is logged (INFO) with its time, so that a slow start shows where it stands.
        started = time.monotonic()
        log.info("engine start-up: loading the model weights")
        model = self._loader()
        log.info("engine start-up: weights loaded in %.1f s; building the decoder", time.monotonic() - started)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        self.eos_ids = set(self._extra_eos) | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.decoder = Qwen2Decoder(
            model, max_rows=self.max_batch + self.pool.spare_rows, max_len=self.max_len,
            lora_slots=self.lora_slots, lora_rank=self.lora_rank, merge=self._merge, fuse=self._fuse)
        del model
        gc.collect()
        log.info("engine start-up: decoder built at %.1f s; capturing decode graphs for up to %d rows",
                 time.monotonic() - started, self.max_batch)
        self.decoder.prepare(self.max_batch)
        log.info("engine start-up: graphs ready at %.1f s", time.monotonic() - started)
        self.sampler = RowSampler(self.max_batch, self.decoder.dims.vocab, self.decoder.device)
        self._active_rows = torch.zeros(self.max_batch, dtype=torch.long, device=self.decoder.device)
        # Rows no request runs in decode at the one position whose KV is never kept (see _finish).
        self.decoder.positions.fill_(self.max_len - 1)
        with self._cv:
            self.pool.clear()

    @property
    def sizing(self) -> str:
        """How the batch was sized and what start-up prepared, for the worker's ready log."""
        decoder = self.decoder
        if decoder is None or decoder.graphs is None:
            return self._kv_sizing
        graphs = (f"{decoder.graph_captures} decode graphs (rows buckets up to {self.max_batch} x "
                  f"{len(decoder.lora_modes())} LoRA modes) captured in {decoder.graph_capture_s:.1f} s, "
                  f"prompt passes warmed in {decoder.warmup_s:.1f} s")
        return f"{self._kv_sizing}; {graphs}" if self._kv_sizing else graphs

    @property
    def released(self) -> bool:
        return self.decoder is None

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        self.decoder = None
        self.sampler = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the weights, KV cache and graph pools back to the driver

    def release(self) -> None:
        """Refuse new requests, let running ones finish, then free the model and its GPU memory."""
        with self._cv:
            self._releasing = True
            while self._waiting or any(self._rows):
                self._cv.wait(timeout=0.1)
        self._call_in_loop(self._free)

    def _free(self) -> None:
        self.decoder = None
        self.sampler = None
        with self._cv:
            self.slots.forget_all()
            self.pool.clear()
        self._active = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def reclaim(self) -> None:
        """Load the base model again (adapters must be loaded again by the caller)."""
        if self.decoder is None:
            self._call_in_loop(self._build)
        with self._cv:
            self._releasing = False

    # --- adapters -------------------------------------------------------------------------------
    @property
    def active(self) -> str | None:
        return self._active

    def has_adapter(self, name: str) -> bool:
        with self._cv:
            return name in self.slots

    def load_adapter(self, name: str, path: str | Path, base_model: str = "", *,
                     slot_wait_s: float = 120.0) -> float:
        """Validate and copy an adapter into a free slot; returns how long decoding stalled (ms)."""
        if self.has_adapter(name):
            return 0.0
        if not same_base(base_model, self.model_name):
            raise AdapterRefusedError(f"adapter {name} was trained on {base_model!r} but this worker "
                                      f"serves {self.model_name!r}; retrain it on the served model")
        decoder = self.decoder
        if decoder is None:
            raise EngineError("the model is unloaded (GPU released for training)")
        weights = read_adapter(path, decoder.dims, max_rank=self.lora_rank, model_name=self.model_name)
        with self._cv:
            deadline = time.monotonic() + slot_wait_s
            while not (free := self.slots.free(self._active)):
                # Every slot serves running requests: they end within one reply, so wait for one.
                if not self._cv.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise EngineError(f"all {self.lora_slots} adapter slots served running requests for "
                                      f"{slot_wait_s:.0f}s; try again or raise PERSONABOT_LORA_SLOTS")
            stale = {i: self.slots.key(i) for i in free}
            slot = self.slots.claim_for_write(free)
        stall: list[float] = []

        def copy() -> None:
            with self._cv:
                self.pool.drop_key(stale[slot])
            started = time.perf_counter()
            decoder.write_lora(slot, weights)
            if decoder.device.type == "cuda":
                torch.cuda.synchronize()
            stall.append((time.perf_counter() - started) * 1000)

        try:
            self._call_in_loop(copy)
        finally:
            with self._cv:
                self.slots.end_write(slot, name if stall else None)
        self._counters["adapter_loads"] += 1
        return stall[0]

    def set_active(self, name: str | None) -> None:
        with self._cv:
            if name is not None and name not in self.slots:
                raise EngineError(f"adapter {name} is not loaded; load_adapter it first")
            self._active = name
        self._counters["swaps"] += 1

    # --- requests -------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationStream:
        if not request.prompt_ids:
            raise EngineError("the prompt is empty; send a non-empty message")
        if len(request.prompt_ids) >= self.max_len:
            raise EngineError(f"the prompt has {len(request.prompt_ids)} tokens; the context holds "
                              f"{self.max_len}; shorten it or raise PERSONABOT_CONTEXT_TOKENS")
        stream = GenerationStream(request)
        with self._cv:
            if self._releasing or self.decoder is None:
                raise EngineError("the model is unloaded while training uses the GPU; try again later")
            name = self._active if request.adapter == ACTIVE else request.adapter
            slot = None
            if name is not None:
                if name not in self.slots:
                    raise EngineError(f"adapter {name} is not loaded in this worker")
                slot = self.slots.acquire(name)
            stream.lora_slot, stream.adapter = slot, name
            self._waiting.append(stream)
            self._cv.notify_all()
        return stream

    def cancel(self, request_id: str, reason: str = FINISH_CANCELLED) -> None:
        with self._cv:
            for stream in list(self._waiting):
                if stream.request.request_id == request_id:
                    self._waiting.remove(stream)
                    self.slots.release(stream.lora_slot)
                    stream.items.put(GenerationDone(reason, 0, stream.adapter))
                    return
            self._cancels[request_id] = reason
            self._cv.notify_all()

    def stats(self) -> dict[str, int | float]:
        with self._cv:
            counters = dict(self._counters)
            counters["running"] = sum(1 for row in self._rows if row)
            counters["prefilling"] = sum(1 for row in self._rows if row and not row.decoding)
            counters["prefill_chunk"] = self.prefill_chunk
            counters["waiting"] = len(self._waiting)
            counters["max_batch"] = self.max_batch
            counters.update(self.pool.stats())
        counters.update(self.pool.capacity(self.max_len))
        counters["graphs"] = self.decoder.graph_captures if self.decoder else 0
        counters["graph_capture_s"] = round(self.decoder.graph_capture_s, 2) if self.decoder else 0.0
        return counters

    # --- decode loop ----------------------------------------------------------------------------
    def _call_in_loop(self, op: Callable[[], None]) -> None:
        done = threading.Event()
        failure: list[BaseException] = []

        def wrapped() -> None:
            try:
                op()
            except BaseException as error:  # noqa: BLE001 - handed back to the caller
                failure.append(error)
            finally:
                done.set()

        with self._cv:
            if self._stop:
                raise EngineError("the engine is closed")
            self._ops.append(wrapped)
            self._cv.notify_all()
        done.wait()
        if failure:
            raise failure[0]

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._ops or self._cancels or any(self._rows)
                           or (self._waiting and None in self._rows)):
                    self._cv.wait()
                if self._stop:
                    return
                ops = list(self._ops)
                self._ops.clear()
                cancels = dict(self._cancels)
                self._cancels.clear()
            for op in ops:
                op()
            for index, row in enumerate(self._rows):
                if row is not None and row.stream.request.request_id in cancels:
                    self._finish(index, cancels[row.stream.request.request_id])
            with self._cv:
                admits = self._plan_admits() if self.decoder is not None else []
            try:
                if admits:
                    self._admit(admits)
                if any(row is not None and not row.decoding for row in self._rows):
                    self._prefill()
                if any(row is not None and row.decoding for row in self._rows):
                    self._step()
            except Exception as error:
                log.exception("decode step failed")
                with self._cv:
                    self.pool.clear()  # a copy or prefill may have stopped half way: trust no parked KV
                for index, row in enumerate(self._rows):
                    if row is not None:
                        self._finish(index, FINISH_ERROR, f"generation failed: {type(error).__name__}: {error}")

    def _plan_admits(self) -> list[tuple[Plan, GenerationStream]]:
        """Take waiting requests, oldest first, while decode rows are free; their prompts are then
        prefilled in chunks (`_prefill`), so a long one holds only its own row."""
        free = [i for i, row in enumerate(self._rows) if row is None]
        if not (self._waiting and free):
            return []
        # Rows still in prefill are copy sources too: their KV is written for ids[:position].
        running = [(i, row.ids, row.position, row.key) for i, row in enumerate(self._rows) if row is not None]
        admits: list[tuple[Plan, GenerationStream]] = []
        while self._waiting and free:
            stream = self._waiting[0]
            plan = self.pool.plan(stream.request.prompt_ids, self.slots.key(stream.lora_slot), free, running)
            self.pool.commit(plan)
            free.remove(plan.target)
            admits.append((plan, self._waiting.popleft()))
        return admits

    def _admit(self, admits: list[tuple[Plan, GenerationStream]]) -> None:
        """Copy reused prefixes into place and give each request its row; its prompt is computed
        from the end of the reused prefix by the next prefill passes."""
        decoder = self.decoder
        assert decoder is not None
        for plan, _ in admits:
            for op, first, second, tokens in plan.ops:
                (decoder.swap_prefix if op == "swap" else decoder.copy_prefix)(first, second, tokens)
                self._counters["prefix_copies"] += 1
        for plan, stream in admits:
            index = plan.target
            self._rows[index] = _Row(stream, stream.lora_slot, stream.adapter, self.slots.key(stream.lora_slot),
                                     list(stream.request.prompt_ids), next(self._order), position=plan.reuse)
            decoder.set_row_lora(index, stream.lora_slot)
            # Until its prompt is in, decode steps write this row's K/V only where no kept KV lies (see _finish).
            decoder.positions[index] = self.max_len - 1
            self._counters["prefix_hit_tokens"] += plan.reuse

    def _prefill(self) -> None:
        """One prefill pass: at most `prefill_chunk` prompt tokens over the rows in prefill, short
        prompts first, then the oldest (see chunking.chunk_shares); a row whose last chunk ran gets its
        first token. The decode step that follows runs the rows already decoding, so a long new
        history delays running streams by one chunk at a time."""
        decoder, sampler = self.decoder, self.sampler
        assert decoder is not None and sampler is not None
        pending = sorted(((i, row) for i, row in enumerate(self._rows) if row is not None and not row.decoding),
                         key=lambda item: item[1].order)
        shares = chunk_shares([len(row.ids) - row.position for _, row in pending], self.prefill_chunk)
        chunks = [(i, row, share) for (i, row), share in zip(pending, shares, strict=True) if share]
        logits = decoder.prefill([i for i, _, _ in chunks], [row.ids for _, row, _ in chunks],
                                 [row.lora_slot for _, row, _ in chunks], [row.position for _, row, _ in chunks],
                                 [row.position + share for _, row, share in chunks])
        done: list[tuple[int, torch.Tensor]] = []
        for n, (index, row, share) in enumerate(chunks):
            row.position += share
            self._counters["prefill_tokens"] += share
            self._counters["prefill_chunks"] += 1
            if row.position < len(row.ids):
                continue
            request = row.stream.request
            # Configured only now: decode steps sample and observe every row of their bucket.
            sampler.configure(index, request.prompt_ids, temperature=request.temperature,
                              top_p=request.top_p, penalty=request.repetition_penalty, seed=request.seed)
            token = sampler.sample(logits[n:n + 1], [index], start=index)
            if sampler.uses_penalty([index]):
                sampler.observe(token, start=index)
            decoder.tokens[index] = token[0]
            decoder.positions[index] = row.position
            self._active_rows[index] = 1
            row.decoding = True
            done.append((index, token))
            self._counters["prefills"] += 1
        self._counters["prefill_passes"] += 1
        if done:
            for (index, _), token in zip(done, torch.cat([t for _, t in done]).tolist(), strict=True):
                self._deliver(index, token)

    def _step(self) -> None:
        decoder, sampler = self.decoder, self.sampler
        assert decoder is not None and sampler is not None
        active = [i for i, row in enumerate(self._rows) if row is not None and row.decoding]
        rows = min(bucket_of(active[-1] + 1), self.max_batch)
        slots = {self._rows[i].lora_slot for i in active}  # type: ignore[union-attr]
        mode: LoraMode = next(iter(slots)) if len(slots) == 1 else MIXED
        if isinstance(mode, int) and decoder.can_merge:
            mode = self._merge_policy.mode(decoder, mode, self._counters)
        logits = decoder.decode(rows, mode)
        tokens = sampler.sample(logits, active)
        if sampler.uses_penalty(active):
            sampler.observe(tokens)
        decoder.tokens[:rows] = tokens
        decoder.positions[:self.max_batch].add_(self._active_rows)
        host = tokens.tolist()
        self._counters["decode_steps"] += 1
        if len(active) < sum(1 for row in self._rows if row is not None):
            self._counters["steps_between_chunks"] += 1  # a prompt still in prefill waited one step
        self._counters["decode_rows"] += len(active)
        self._counters["max_batch_seen"] = max(self._counters["max_batch_seen"], len(active))
        for index in active:
            row = self._rows[index]
            assert row is not None
            row.position += 1
            self._deliver(index, host[index])

    def _deliver(self, index: int, token: int) -> None:
        row = self._rows[index]
        assert row is not None
        request = row.stream.request
        row.ids.append(token)  # fed back at the next step unless the request ends here
        if token in self.eos_ids and row.generated >= request.min_new_tokens:
            self._finish(index, FINISH_STOP)
            return
        row.generated += 1
        self._counters["tokens"] += 1
        if row.stream.first_token_at is None:
            row.stream.first_token_at = time.monotonic()
        row.stream.items.put([token])
        if row.generated >= request.max_new_tokens or row.position + 1 >= self.max_len:
            self._finish(index, FINISH_LENGTH)

    def _finish(self, index: int, reason: str, error: str = "") -> None:
        row = self._rows[index]
        assert row is not None
        self._rows[index] = None
        if self.sampler is not None and self.decoder is not None:
            self.sampler.clear(index)
            self._active_rows[index] = 0
            # Decode steps still run this row (rows [0, bucket) at once) and write a K/V at its
            # position: max_len - 1 is never part of kept KV (a request ends before it writes there).
            self.decoder.positions[index] = self.max_len - 1
        row.stream.items.put(GenerationDone(reason, row.generated, row.adapter, error))
        with self._cv:
            if reason != FINISH_ERROR and self.decoder is not None:
                self.pool.park(index, row.ids[:row.position], row.key)
            self.slots.release(row.lora_slot)
            self._counters["finished"] += 1
            self._cv.notify_all()
