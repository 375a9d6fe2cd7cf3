"""KV reuse on CPU: a follow-up or a shared system prompt prefills only what is new, with unchanged tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from personabot.workers.engine import ACTIVE, GenerationDone, GenerationRequest
from personabot.workers.engine.prefix_cache import PrefixPool, common_prefix
from personabot.workers.engine.scheduler import HFEngine, load_hf_model
from tests.workers.conftest import make_adapter
from tests.workers.test_engine import collect, reference

SYSTEM = list(range(30, 70))  # a persona system prompt every chat starts with
_ids = iter(range(10**6))


def ask(prompt: list[int], adapter: str | None = ACTIVE, n: int = 12, **kw: Any) -> GenerationRequest:
    return GenerationRequest(request_id=f"p{next(_ids)}", prompt_ids=prompt, max_new_tokens=n, adapter=adapter, **kw)


def make_engine(tiny_model: Path, **kw: Any) -> HFEngine:
    options = {"max_batch": 4, "max_len": 256, "lora_slots": 3, "lora_rank": 8, "merge": False, **kw}
    return HFEngine(lambda: load_hf_model(str(tiny_model), device="cpu"), model_name=str(tiny_model), **options)


@pytest.fixture()
def engine(tiny_model: Path, tiny_adapter: Path) -> Iterator[HFEngine]:
    built = make_engine(tiny_model)
    built.load_adapter("v1", tiny_adapter)
    built.set_active("v1")
    yield built
    built.close()


def delta(engine: HFEngine, before: dict[str, int | float], name: str) -> int | float:
    return engine.stats()[name] - before[name]


def resident(prompt: list[int], reply: list[int], done: GenerationDone) -> int:
    """Tokens whose KV a finished request leaves: the prompt and every reply token fed back (the
    last one of a length-capped reply never is; an end-of-text token is never delivered)."""
    return len(prompt) + len(reply) - (1 if done.finish_reason == "length" else 0)


def test_common_prefix_and_plans() -> None:
    assert common_prefix([1, 2, 3, 4], [1, 2, 9], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 10) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 2) == 2
    assert common_prefix([5], [1], 10) == 0
    base = list(range(1000, 1300))
    for cut in (0, 1, 15, 16, 17, 47, 48, 200, 299):  # across the growing compare chunks
        assert common_prefix(base, base[:cut] + [7] + base[cut + 1:], 1000) == cut
    assert common_prefix(base, base + [1], 1000) == 300 and common_prefix(base, base, 250) == 250
    pool = PrefixPool(decode_rows=3, spare_rows=1)
    pool.park(0, [1, 2, 3, 4], None)
    pool.park(1, [1, 2, 7], ("v1", 1))
    follow_up = pool.plan([1, 2, 3, 4, 5], None, [0, 1, 2], [])
    assert (follow_up.target, follow_up.reuse, follow_up.ops) == (0, 4, [])
    # Another chat with the same start: chat 0's KV moves to the empty spare row, the shared part stays.
    other_chat = pool.plan([1, 2, 3, 9, 9], None, [0, 1, 2], [])
    assert (other_chat.target, other_chat.reuse, other_chat.ops) == (0, 3, [("copy", 0, 3, 4)])
    assert pool.plan([1, 2, 7, 8], ("v1", 2), [0, 1, 2], []).reuse == 0  # other weights, same name
    from_running = pool.plan([8, 8, 8, 1], None, [1, 2], [(0, [8, 8, 8, 8], 3, None)])
    assert (from_running.target, from_running.reuse) == (1, 3)
    assert from_running.ops == [("copy", 1, 3, 3), ("copy", 0, 1, 3)]  # move row 1's KV away, then copy
    pool.park(2, [6, 6], None)
    swapped = pool.plan([6, 6, 5], None, [0, 1, 2], [])  # a chat parked high runs in the lowest free row
    assert (swapped.target, swapped.reuse, swapped.ops) == (0, 2, [("swap", 2, 0, 4)])
    pool.commit(swapped)
    assert 0 not in pool.entries and pool.entries[2].ids == [1, 2, 3, 4]
    full = PrefixPool(decode_rows=2)
    full.park(0, [1], None)
    full.park(1, [2], None)
    dropped = full.plan([3, 3], None, [0, 1], [])  # row 0 holds the least recently used KV: it goes
    full.commit(dropped)
    assert (dropped.target, dropped.ops, list(full.entries)) == (0, [], [1])


def test_suffix_prefill_gives_the_cold_logits_and_decode(tiny_model: Path, tiny_adapter: Path) -> None:
    from personabot.workers.engine.adapter_files import read_adapter
    from personabot.workers.engine.qwen2 import Qwen2Decoder

    decoder = Qwen2Decoder(load_hf_model(str(tiny_model), device="cpu"), max_rows=4, max_len=128, lora_slots=2,
                           lora_rank=8, merge=False, fuse=False)
    decoder.write_lora(1, read_adapter(tiny_adapter, decoder.dims, max_rank=8, model_name=str(tiny_model)))
    first, history = SYSTEM + [5, 6, 7], SYSTEM + [5, 6, 7, 8, 9, 10, 11]
    decoder.prefill([0, 1], [first, first], [None, 1])
    for row, slot in ((0, None), (1, 1)):
        decoder.set_row_lora(row, slot)
        decoder.set_row_lora(row + 2, slot)
    # Rows 0 and 1 reuse `first` (one mixed base/adapter pass); rows 2 and 3 prefill the history cold.
    reused = decoder.prefill([0, 1], [history, history], [None, 1], [len(first), len(first)])
    cold = decoder.prefill([2, 3], [history, history], [None, 1])
    assert torch.allclose(reused, cold, rtol=1e-5, atol=1e-5)
    decoder.copy_prefix(2, 0, len(history))  # a copied prefix is the same KV
    for layer in range(decoder.dims.layers):
        assert torch.equal(decoder.k_cache[layer][0, :, :len(history)], decoder.k_cache[layer][2, :, :len(history)])
    decoder.tokens[:] = 12
    decoder.positions[:] = len(history)
    steps = decoder.decode(4, "mixed")
    assert torch.allclose(steps[:2], steps[2:], rtol=1e-5, atol=1e-5)


def test_a_follow_up_prefills_only_the_new_message(engine: HFEngine, tiny_model: Path,
                                                   tiny_adapter: Path) -> None:
    prompt, kept = SYSTEM + [5, 6, 7, 8], 0
    for message in ([], [101, 102, 103], [104, 105]):
        prompt = prompt + message
        before = engine.stats()
        reply, done = collect(engine.submit(ask(prompt, n=10)))
        assert reply == reference(tiny_model, tiny_adapter, prompt, 10)  # a cold HF generate of the history
        assert delta(engine, before, "prefix_hit_tokens") == kept  # the whole previous turn, reply included
        assert delta(engine, before, "prefill_tokens") == len(prompt) - kept
        assert engine.stats()["parked_rows"] == 1
        kept = resident(prompt, reply, done)
        prompt = prompt + reply
    assert delta(engine, before, "prefix_copies") == 0  # the chat stayed in its row


def test_reuse_never_crosses_adapter_versions(engine: HFEngine, tiny_model: Path, tiny_adapter: Path,
                                              tiny_adapter_2: Path, tmp_path: Path) -> None:
    engine.load_adapter("v2", tiny_adapter_2)
    prompt = SYSTEM + [9, 8, 7]
    weights = {"v1": tiny_adapter, "v2": tiny_adapter_2, None: None}
    replies = {}
    for adapter in ("v1", "v2", None):  # the same prompt under three weights: nothing to reuse
        before = engine.stats()
        replies[adapter] = collect(engine.submit(ask(prompt, adapter)))
        assert replies[adapter][0] == reference(tiny_model, weights[adapter], prompt, 12)
        assert delta(engine, before, "prefix_hit_tokens") == 0
    assert engine.stats()["parked_rows"] == 3
    for adapter in ("v1", "v2", None):  # each follow-up finds its own turn
        before = engine.stats()
        follow_up = prompt + replies[adapter][0] + [1]
        tokens, _ = collect(engine.submit(ask(follow_up, adapter)))
        assert tokens == reference(tiny_model, weights[adapter], follow_up, 12)
        assert delta(engine, before, "prefix_hit_tokens") == resident(prompt, *replies[adapter])
    # "v1" leaves its slot, then a different adapter is loaded under the same name: a new key.
    engine.load_adapter("v3", make_adapter(tiny_model, tmp_path / "v3", seed=3))
    engine.set_active("v3")
    engine.load_adapter("v4", make_adapter(tiny_model, tmp_path / "v4", seed=4))
    assert not engine.has_adapter("v1")
    engine.load_adapter("v1", tiny_adapter_2)
    before = engine.stats()
    tokens, _ = collect(engine.submit(ask(prompt + [1, 2], "v1")))
    assert tokens == reference(tiny_model, tiny_adapter_2, prompt + [1, 2], 12)
    assert delta(engine, before, "prefix_hit_tokens") == 0


def test_eviction_under_pressure_then_a_cold_prefill(tiny_model: Path) -> None:
    engine = make_engine(tiny_model, max_batch=2)
    try:
        chats = {name: [start] + SYSTEM for name, start in (("a", 1), ("b", 2), ("c", 3))}
        for prompt in chats.values():  # three chats, two rows: chat a's row is taken by chat c
            collect(engine.submit(ask(prompt, None, n=4)))
        assert engine.stats()["parked_rows"] == 2
        before = engine.stats()
        follow_up = chats["a"] + [11, 12]
        tokens, _ = collect(engine.submit(ask(follow_up, None, n=8)))
        assert tokens == reference(tiny_model, None, follow_up, 8)
        assert delta(engine, before, "prefix_hit_tokens") == 0
        assert delta(engine, before, "prefill_tokens") == len(follow_up)
        engine.release()  # the model leaves the GPU: so does every parked KV
        assert engine.stats()["parked_rows"] == 0
        engine.reclaim()
        before = engine.stats()
        tokens, _ = collect(engine.submit(ask(follow_up, None, n=8)))
        assert tokens == reference(tiny_model, None, follow_up, 8)
        assert delta(engine, before, "prefix_hit_tokens") == 0
    finally:
        engine.close()


def test_spare_rows_keep_evicted_chats_and_a_cap_bounds_the_pool(tiny_model: Path) -> None:
    engine = make_engine(tiny_model, max_batch=2, spare_rows=1)
    try:
        chats = {name: [start] + SYSTEM for name, start in (("a", 1), ("b", 2), ("c", 3))}
        replies = {name: collect(engine.submit(ask(prompt, None, n=4))) for name, prompt in chats.items()}
        assert engine.stats()["parked_rows"] == 3 and engine.stats()["kv_rows"] == 3
        before = engine.stats()
        follow_up = chats["a"] + replies["a"][0] + [11, 12]
        tokens, _ = collect(engine.submit(ask(follow_up, None, n=8)))
        assert tokens == reference(tiny_model, None, follow_up, 8)
        assert delta(engine, before, "prefix_hit_tokens") == resident(chats["a"], *replies["a"])
        assert delta(engine, before, "prefix_copies") >= 1  # back from the spare row
    finally:
        engine.close()
    capped = make_engine(tiny_model, max_batch=3, prefix_rows=1)
    try:
        for start in (1, 2, 3):
            collect(capped.submit(ask([start] + SYSTEM, None, n=4)))
        assert capped.stats()["parked_rows"] == 1
    finally:
        capped.close()
    off = make_engine(tiny_model, max_batch=2, prefix_cache=False)
    try:
        collect(off.submit(ask(SYSTEM, None, n=4)))
        before = off.stats()
        tokens, _ = collect(off.submit(ask(SYSTEM + [1], None, n=4)))
        assert tokens == reference(tiny_model, None, SYSTEM + [1], 4)
        assert delta(off, before, "prefix_hit_tokens") == 0 and off.stats()["parked_rows"] == 0
    finally:
        off.close()


def test_concurrent_chats_copy_the_shared_system_prompt(engine: HFEngine, tiny_model: Path,
                                                        tiny_adapter: Path) -> None:
    running = engine.submit(ask(SYSTEM + [1], n=80, min_new_tokens=10**9))
    assert running.next_batch(timeout=30)  # chat 1 runs, its system prompt KV is written
    before = engine.stats()
    others = [SYSTEM + [2, 3], SYSTEM + [4, 5, 6]]
    streams = [engine.submit(ask(prompt, n=10)) for prompt in others]
    for prompt, stream in zip(others, streams, strict=True):
        assert collect(stream)[0] == reference(tiny_model, tiny_adapter, prompt, 10)
    assert delta(engine, before, "prefix_hit_tokens") == 2 * len(SYSTEM)
    assert delta(engine, before, "prefix_copies") == 2
    assert delta(engine, before, "prefill_tokens") == sum(len(p) for p in others) - 2 * len(SYSTEM)
    engine.cancel(running.request.request_id)
    collect(running)


def _assert_parked_kv_is_cold_kv(engine: HFEngine, tiny_model: Path) -> None:
    """Every parked base-model row holds exactly the KV a cold prefill of its ids writes."""
    from personabot.workers.engine.qwen2 import Qwen2Decoder

    cold = Qwen2Decoder(load_hf_model(str(tiny_model), device="cpu"), max_rows=1, max_len=engine.max_len,
                        lora_slots=1, lora_rank=8, merge=False, fuse=False)
    decoder = engine.decoder
    assert decoder is not None and engine.stats()["running"] == 0
    for row, entry in engine.pool.entries.items():
        assert entry.key is None and 0 < len(entry.ids) < engine.max_len - 1
        cold.prefill([0], [entry.ids], [None])
        n = len(entry.ids)
        for layer in range(cold.dims.layers):
            assert torch.allclose(decoder.k_cache[layer][row, :, :n], cold.k_cache[layer][0, :, :n], atol=1e-5)
            assert torch.allclose(decoder.v_cache[layer][row, :, :n], cold.v_cache[layer][0, :, :n], atol=1e-5)


def test_cancelled_requests_leave_the_pool_consistent(engine: HFEngine, tiny_model: Path) -> None:
    mid_reply = engine.submit(ask(SYSTEM + [99], None, n=50, min_new_tokens=10**9))
    assert mid_reply.next_batch(timeout=30)
    engine.cancel(mid_reply.request.request_id)
    assert collect(mid_reply)[1].finish_reason == "cancelled"
    assert engine.stats()["parked_rows"] == 1
    prompts = [SYSTEM + [k, k + 1] for k in range(1, 9)]
    streams = []
    for prompt in prompts:  # cancelled while waiting, just admitted, or mid-reply
        streams.append(engine.submit(ask(prompt, None, n=30, min_new_tokens=10**9)))
        engine.cancel(streams[-1].request.request_id)
    results = [collect(stream) for stream in streams]
    assert all(done.finish_reason == "cancelled" for _, done in results)
    _assert_parked_kv_is_cold_kv(engine, tiny_model)
    for prompt in prompts[:3]:
        follow_up = prompt + [200]
        tokens, _ = collect(engine.submit(ask(follow_up, None, n=6)))
        assert tokens == reference(tiny_model, None, follow_up, 6)
    _assert_parked_kv_is_cold_kv(engine, tiny_model)


def test_a_parked_row_between_running_rows_keeps_its_kv(engine: HFEngine, tiny_model: Path) -> None:
    """Decode steps run rows [0, bucket) at once: a parked row inside the bucket must not be written."""
    long_a = engine.submit(ask([1] + SYSTEM, None, n=60, min_new_tokens=10**9))
    assert long_a.next_batch(timeout=30)
    short = engine.submit(ask([2] + SYSTEM, None, n=3, min_new_tokens=10**9))
    long_c = engine.submit(ask([3] + SYSTEM, None, n=60, min_new_tokens=10**9))
    reply, done = collect(short)  # its row (1) parks while rows 0 and 2 keep decoding
    collect(long_a)
    collect(long_c)
    follow_up = [2] + SYSTEM + reply + [7]
    before = engine.stats()
    tokens, _ = collect(engine.submit(ask(follow_up, None, n=8)))
    assert delta(engine, before, "prefix_hit_tokens") == resident([2] + SYSTEM, reply, done)
    assert tokens == reference(tiny_model, None, follow_up, 8)
    _assert_parked_kv_is_cold_kv(engine, tiny_model)
