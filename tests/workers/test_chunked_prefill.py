"""Chunked prefill on CPU: the chunks give the one-shot tokens, and running streams, arrivals and
cancellations are served between a long prompt's chunks."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from personabot.workers.engine import GenerationStream
from personabot.workers.engine.chunking import chunk_shares
from personabot.workers.engine.scheduler import HFEngine
from tests.workers.test_engine import collect, reference
from tests.workers.test_prefix_cache import SYSTEM, _assert_parked_kv_is_cold_kv, ask, delta, make_engine

CHUNK = 7
LONG = [(17 * i + 3) % 900 + 10 for i in range(230)]  # 33 chunks of 7 tokens


@pytest.fixture()
def engine(tiny_model: Path, tiny_adapter: Path, tiny_adapter_2: Path) -> Iterator[HFEngine]:
    built = make_engine(tiny_model, prefill_chunk=CHUNK)
    built.load_adapter("v1", tiny_adapter)
    built.load_adapter("v2", tiny_adapter_2)
    built.set_active("v1")
    yield built
    built.close()


class LoopGate:
    """Holds the engine's loop between two iterations (an op of the loop waits), so a test acts at a
    known point of a prefill: `step()` lets exactly one iteration (admission, one prefill pass, one
    decode step) run and holds the loop again."""

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        self._held: tuple[threading.Event, threading.Thread] | None = None

    def step(self) -> None:
        """Queue a waiting op, let the op holding the loop (if any) return, and wait until the loop
        runs the new one: the loop ran one iteration in between."""
        entered, resume = threading.Event(), threading.Event()

        def op() -> None:
            entered.set()
            resume.wait(60)

        holder = threading.Thread(target=self.engine._call_in_loop, args=(op,))
        holder.start()
        if self._held is not None:
            deadline = time.monotonic() + 60
            while not self._queued():  # queued while the loop is held: the loop takes it next
                assert time.monotonic() < deadline, "the op was not queued"
                time.sleep(0.001)
            self.release()
        assert entered.wait(60), "the engine loop did not take the op"
        self._held = (resume, holder)

    def _queued(self) -> bool:
        with self.engine._cv:
            return bool(self.engine._ops)

    def release(self) -> None:
        if self._held is not None:
            resume, holder = self._held
            self._held = None
            resume.set()
            holder.join(60)


@contextmanager
def gate(engine: HFEngine) -> Iterator[LoopGate]:
    """The engine's loop held until the block ends (`step()` inside lets it run one iteration)."""
    loop = LoopGate(engine)
    loop.step()
    try:
        yield loop
    finally:
        loop.release()


def mid_prefill(engine: HFEngine, stream: GenerationStream, before: dict[str, Any], chunks: int) -> None:
    """While the loop is held: the stream's prompt has had exactly `chunks` chunks and is still in prefill."""
    assert delta(engine, before, "prefill_chunks") == chunks
    assert delta(engine, before, "prefill_tokens") == chunks * CHUNK < len(stream.request.prompt_ids)
    assert stream.first_token_at is None and engine.stats()["prefilling"] == 1


def test_chunk_shares() -> None:
    assert chunk_shares([3000, 40, 40], 512) == [432, 40, 40]  # short prompts complete in one pass
    assert chunk_shares([3000, 3000, 3000, 40], 512) == [472, 0, 0, 40]  # however many long ones wait
    assert chunk_shares([500] * 3, 512) == [500, 12, 0]  # a wave completes in arrival order
    assert chunk_shares([200] * 4 + [300], 512) == [200, 56, 0, 0, 256]  # each class has half, oldest first
    assert chunk_shares([0, 3, 1], 7) == [0, 3, 1]  # less than the budget: all of it
    assert chunk_shares([], 7) == []
    with pytest.raises(ValueError, match="at least 1"):
        chunk_shares([5], 0)


def test_chunks_give_the_one_shot_logits_and_kv(tiny_model: Path, tiny_adapter: Path) -> None:
    from personabot.workers.engine.adapter_files import read_adapter
    from personabot.workers.engine.qwen2 import Qwen2Decoder
    from personabot.workers.engine.scheduler import load_hf_model

    decoder = Qwen2Decoder(load_hf_model(str(tiny_model), device="cpu"), max_rows=7, max_len=128, lora_slots=2,
                           lora_rank=8, merge=False, fuse=False)
    decoder.write_lora(1, read_adapter(tiny_adapter, decoder.dims, max_rank=8, model_name=str(tiny_model)))
    prompts = [SYSTEM + [5, 6, 7, 8, 9], SYSTEM[:25] + [300, 301]]
    slots = [1, None]
    one_shot = decoder.prefill([0, 1], prompts, slots)
    # Rows 2 and 3 take the same prompts in chunks of 7, both rows in every pass (one mixed pass each):
    # the first chunk cold, the next ones over the rows' cached chunks, which end at the same place.
    # Rows 4 and 6 start from a reused prefix of different lengths (copied), so chunks of equal size
    # end at different places (one masked attention call over keys padded to the longer row, gathered
    # from rows that are not next to each other).
    decoder.copy_prefix(0, 4, 11)
    decoder.copy_prefix(1, 6, 4)
    for rows, starts in (([2, 3], [0, 0]), ([4, 6], [11, 4])):
        done, last = list(starts), [torch.empty(0)] * 2
        while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
            part = [i for i in range(2) if done[i] < len(prompts[i])]
            ends = [min(done[i] + CHUNK, len(prompts[i])) for i in part]
            logits = decoder.prefill([rows[i] for i in part], [prompts[i] for i in part], [slots[i] for i in part],
                                     [done[i] for i in part], ends)
            for n, i in enumerate(part):
                done[i], last[i] = ends[n], logits[n]
        assert torch.allclose(torch.stack(last), one_shot, rtol=1e-5, atol=1e-5), rows
        for i, row in enumerate(rows):
            n = len(prompts[i])
            for layer in range(decoder.dims.layers):
                assert torch.allclose(decoder.k_cache[layer][row, :, :n], decoder.k_cache[layer][i, :, :n], atol=1e-5)
                assert torch.allclose(decoder.v_cache[layer][row, :, :n], decoder.v_cache[layer][i, :, :n], atol=1e-5)
    with pytest.raises(ValueError, match="start < end"):
        decoder.prefill([0], [prompts[0]], [None], [5], [5])


def test_chunked_engine_gives_the_one_shot_tokens_with_and_without_reuse(
        engine: HFEngine, tiny_model: Path, tiny_adapter: Path) -> None:
    jobs = [(SYSTEM + [1, 2, 3], "v1"), (SYSTEM[:10] + [4], None), ([8, 9], "v1"), (list(range(100, 160)), None)]
    before = engine.stats()
    streams = [engine.submit(ask(prompt, adapter)) for prompt, adapter in jobs]
    replies = [collect(stream) for stream in streams]
    weights = {"v1": tiny_adapter, None: None}
    for (prompt, adapter), (tokens, _) in zip(jobs, replies, strict=True):
        assert tokens == reference(tiny_model, weights[adapter], prompt, 12), (prompt, adapter)
    assert delta(engine, before, "prefill_chunks") > len(jobs)  # the long prompts took several passes
    assert delta(engine, before, "prefill_tokens") + delta(engine, before, "prefix_hit_tokens") == \
        sum(len(p) for p, _ in jobs)
    # A follow-up reuses the whole previous turn and prefills only the new tokens, in chunks.
    prompt, adapter = jobs[0]
    follow_up = prompt + replies[0][0] + list(range(400, 420))
    before = engine.stats()
    tokens, _ = collect(engine.submit(ask(follow_up, adapter)))
    assert tokens == reference(tiny_model, tiny_adapter, follow_up, 12)
    computed = delta(engine, before, "prefill_tokens")
    assert delta(engine, before, "prefix_hit_tokens") == len(follow_up) - computed >= len(prompt)
    assert delta(engine, before, "prefill_chunks") == math.ceil(computed / CHUNK)


def test_a_long_prompt_lets_running_streams_step_between_its_chunks(engine: HFEngine, tiny_model: Path) -> None:
    before = engine.stats()
    with gate(engine) as loop:
        running = engine.submit(ask([5, 6, 7], None, n=240, min_new_tokens=10**9))
        loop.step()  # prefilled in one pass: it decodes from now on, far longer than the long prompt's prefill
        long = engine.submit(ask(LONG, None, n=5))
    tokens, _ = collect(long)
    chunks = math.ceil(len(LONG) / CHUNK)
    assert delta(engine, before, "prefill_chunks") == 1 + chunks
    # Each of the long prompt's passes but the last was followed by a decode step of the running stream.
    assert delta(engine, before, "steps_between_chunks") >= chunks - 1
    assert tokens == reference(tiny_model, None, LONG, 5)
    assert collect(running)[0] == reference(tiny_model, None, [5, 6, 7], 240)  # undisturbed by the chunks


def test_a_request_arriving_mid_prefill_is_served_first_and_both_match_solo(
        engine: HFEngine, tiny_model: Path, tiny_adapter: Path) -> None:
    before = engine.stats()
    with gate(engine) as loop:
        long = engine.submit(ask(LONG, None, n=6))
        loop.step()  # admitted, first chunk
        loop.step()
        mid_prefill(engine, long, before, 2)
        short = engine.submit(ask(SYSTEM[:3], "v1", n=6))  # at most half a chunk: it goes first
    short_tokens, _ = collect(short)
    long_tokens, _ = collect(long)
    assert short_tokens == reference(tiny_model, tiny_adapter, SYSTEM[:3], 6)
    assert long_tokens == reference(tiny_model, None, LONG, 6)
    # The short prompt did not wait for the long one's remaining chunks.
    assert short.first_token_at is not None and long.first_token_at is not None
    assert short.first_token_at < long.first_token_at


def cancel_mid_prefill(engine: HFEngine, prompt: list[int], adapter: str | None) -> int:
    """Submit `prompt` and cancel it after its third chunk; returns the prompt tokens it computed."""
    before = engine.stats()
    with gate(engine) as loop:
        stream = engine.submit(ask(prompt, adapter, n=20))
        loop.step()
        loop.step()
        mid_prefill(engine, stream, before, 2)
        # Taken at the start of the iteration after the held one, which computes a third chunk.
        engine.cancel(stream.request.request_id)
    tokens, done = collect(stream)
    assert (tokens, done.finish_reason, done.completion_tokens) == ([], "cancelled", 0)
    assert delta(engine, before, "prefill_tokens") == 3 * CHUNK
    return 3 * CHUNK


def test_cancel_mid_prefill_frees_the_row_and_parks_the_computed_prefix(tiny_model: Path, tiny_adapter: Path,
                                                                         tiny_adapter_2: Path) -> None:
    engine = make_engine(tiny_model, max_batch=1, lora_slots=2, prefill_chunk=CHUNK)  # one row: it must come back
    try:
        engine.load_adapter("v1", tiny_adapter)
        engine.set_active("v1")
        computed = cancel_mid_prefill(engine, LONG, None)
        stats = engine.stats()
        assert (stats["running"], stats["prefilling"], stats["waiting"]) == (0, 0, 0)
        assert computed < len(LONG) and stats["parked_rows"] == 1 and stats["parked_tokens"] == computed
        _assert_parked_kv_is_cold_kv(engine, tiny_model)  # only KV that was fully computed is kept
        # The same prompt again (a retry) runs in the freed row and starts where the cancelled one stopped.
        before = engine.stats()
        tokens, _ = collect(engine.submit(ask(LONG, None, n=6)))
        assert tokens == reference(tiny_model, None, LONG, 6)
        assert delta(engine, before, "prefix_hit_tokens") == computed
        assert delta(engine, before, "prefill_tokens") == len(LONG) - computed
        # A request on another adapter cancelled mid-prefill gives its slot back: a new adapter can take it.
        engine.load_adapter("v2", tiny_adapter_2)
        cancel_mid_prefill(engine, LONG, "v2")
        engine.load_adapter("v3", tiny_adapter, slot_wait_s=5)
        assert engine.has_adapter("v3") and not engine.has_adapter("v2")
        assert engine.stats()["running"] == 0
        tokens, _ = collect(engine.submit(ask(SYSTEM, "v3", n=6)))
        assert tokens == reference(tiny_model, tiny_adapter, SYSTEM, 6)
    finally:
        engine.close()
