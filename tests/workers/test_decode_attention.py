"""Decode attention over each row's own length (CPU): the torch path equals a naive masked attention, and a
decode step of rows with mixed lengths and mixed adapters gives HF/peft's logits and greedy tokens."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from personabot.workers.engine.adapter_files import read_adapter
from personabot.workers.engine.decode_attention import decode_attention, splits_for, torch_attention
from personabot.workers.engine.layout import MIXED, row_buckets
from personabot.workers.engine.qwen2 import Qwen2Decoder
from personabot.workers.engine.scheduler import load_hf_model
from tests.workers.test_engine import _hf_model


def naive_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """One row and one head at a time: softmax over that row's first `length` keys of the head's KV head."""
    rows, heads, head_dim = q.shape
    group = heads // k_cache.shape[1]
    out = torch.empty_like(q)
    for row in range(rows):
        for head in range(heads):
            keys = k_cache[row, head // group, :lengths[row]]
            values = v_cache[row, head // group, :lengths[row]]
            weights = torch.softmax(keys @ q[row, head] / math.sqrt(head_dim), dim=0)
            out[row, head] = weights @ values
    return out


def test_torch_path_writes_the_step_kv_and_equals_naive_masked_attention() -> None:
    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, head_dim, max_len = 5, 8, 2, 16, 40
    q = torch.randn(rows, heads, head_dim, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(rows, kv_heads, head_dim, generator=generator, dtype=torch.float64) for _ in "kv")
    k_cache = torch.randn(rows + 1, kv_heads, max_len, head_dim, generator=generator, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    positions = torch.tensor([0, 7, 38, 1, 20])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for row, position in enumerate(positions.tolist()):
        expected_k[row, :, position], expected_v[row, :, position] = k[row], v[row]
    out = decode_attention(q, k, v, k_cache, v_cache, positions, positions + 1)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    expected = naive_attention(q, expected_k, expected_v, (positions + 1).tolist())
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-12)
    # Keys past a row's length do not count: garbage there changes nothing.
    k_cache[0, :, 5:], v_cache[1, :, 9:] = 1e4, -1e4
    again = torch_attention(q, k, v, k_cache, v_cache, positions, positions + 1)
    assert torch.allclose(again[:2], expected[:2], rtol=1e-10, atol=1e-12)


def test_split_counts_are_powers_of_two_and_fill_the_gpu() -> None:
    for rows in (1, 2, 7, 32, 256, 512):
        splits = splits_for(rows, 4)
        assert splits & (splits - 1) == 0 and 1 <= splits <= 32
    assert splits_for(1, 4) == 32 and splits_for(256, 4) == 1
    assert row_buckets(40) == [1, 2, 4, 8, 12, 16, 24, 32, 40]  # every row count _step can ask for


def test_mixed_lengths_and_adapters_in_one_step_give_hf_peft_logits_and_tokens(
        tiny_model: Path, tiny_adapter: Path, tiny_adapter_2: Path) -> None:
    """Four rows of lengths 3..40 on the base model and two adapters decode together (one MIXED step per
    token); each row's logits equal a full HF/peft forward of its own sequence, and greedy tokens agree."""
    decoder = Qwen2Decoder(load_hf_model(str(tiny_model), device="cpu"), max_rows=4, max_len=64, lora_slots=2,
                           lora_rank=8, merge=False, fuse=False)
    for slot, adapter in enumerate((tiny_adapter, tiny_adapter_2)):
        decoder.write_lora(slot, read_adapter(adapter, decoder.dims, max_rank=8, model_name=str(tiny_model)))
    prompts = [[5, 6, 7, 8, 9, 10], [100, 200, 300], list(range(20, 60)), [700, 3, 41, 900, 12]]
    slots = [None, 0, 1, 0]
    adapters = {None: None, 0: tiny_adapter, 1: tiny_adapter_2}
    sequences = [list(p) for p in prompts]
    first = decoder.prefill(list(range(4)), prompts, slots)
    for row, slot in enumerate(slots):
        decoder.set_row_lora(row, slot)
        token = int(first[row].argmax())
        sequences[row].append(token)
        decoder.tokens[row], decoder.positions[row] = token, len(prompts[row])
    for _ in range(6):
        logits = decoder.decode(4, MIXED)
        for row, slot in enumerate(slots):
            model = _hf_model(tiny_model, adapters[slot])
            with torch.no_grad():
                expected = model(input_ids=torch.tensor([sequences[row]])).logits[0, -1]
            assert torch.allclose(logits[row], expected, rtol=1e-4, atol=1e-4), (row, len(sequences[row]))
            sequences[row].append(int(logits[row].argmax()))
            assert sequences[row][-1] == int(expected.argmax())
        decoder.tokens[:4] = torch.tensor([s[-1] for s in sequences])
        decoder.positions[:4] += 1
    # The same rows one at a time (row 0 alone, no other length to pad to) give the batch's logits.
    decoder.positions[0] -= 1
    decoder.tokens[0] = sequences[0][-2]
    alone = decoder.decode(1, None)
    with torch.no_grad():
        expected = _hf_model(tiny_model, None)(input_ids=torch.tensor([sequences[0][:-1]])).logits[0, -1]
    assert torch.allclose(alone[0], expected, rtol=1e-4, atol=1e-4)
