"""PERSONABOT_MAX_BATCH=0: the chat worker's KV rows sized from the GPU, with the arithmetic it logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personabot.workers.engine.kv_plan import CPU_ROWS, GIB, KvPlanError, auto_rows, plan_rows, read_shape

QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
H200 = int(139.8 * GIB)
CARD_24GB = int(23.6 * GIB)


@pytest.fixture()
def qwen7b(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    return tmp_path


def test_the_7b_shape_is_read_from_its_config(qwen7b: Path) -> None:
    shape = read_shape(qwen7b)
    assert shape.kv_bytes_per_token() == 28 * 2 * 4 * 128 * 2  # 56 KiB per token in bf16
    assert 7.5e9 < shape.weight_bytes / 2 < 7.7e9  # 7.6 B parameters
    assert 6.4e9 < shape.linear_bytes / 2 < 6.6e9


def test_an_h200_serves_256_rows_beside_a_merged_copy(qwen7b: Path) -> None:
    plan = plan_rows(read_shape(qwen7b), free_bytes=H200, total_bytes=H200, max_len=4096)
    assert plan.rows == 256
    assert "merged adapter copy" in plan.text and "capped at 256" in plan.text and "4096 tokens" in plan.text


def test_a_24gb_card_fits_what_is_left_next_to_the_weights(qwen7b: Path) -> None:
    plan = plan_rows(read_shape(qwen7b), free_bytes=CARD_24GB, total_bytes=CARD_24GB, max_len=4096)
    # 23.6 - 14.2 (weights) - 4 (reserve) = 5.4 GiB of 224 MiB rows
    assert 20 <= plan.rows <= 26 and "no room for a merged adapter copy" in plan.text
    shorter = plan_rows(read_shape(qwen7b), free_bytes=CARD_24GB, total_bytes=CARD_24GB, max_len=2048)
    assert shorter.rows == pytest.approx(2 * plan.rows, abs=1)


def test_training_on_the_same_gpu_halves_the_kv_budget(qwen7b: Path) -> None:
    alone = plan_rows(read_shape(qwen7b), free_bytes=int(60 * GIB), total_bytes=H200, max_len=4096)
    shared = plan_rows(read_shape(qwen7b), free_bytes=int(60 * GIB), total_bytes=H200, max_len=4096,
                       concurrent_training=True)
    assert shared.rows < alone.rows and "halved for training" in shared.text


def test_a_gpu_too_small_names_the_fix(qwen7b: Path) -> None:
    with pytest.raises(KvPlanError, match="PERSONABOT_CONTEXT_TOKENS"):
        plan_rows(read_shape(qwen7b), free_bytes=int(16 * GIB), total_bytes=int(16 * GIB), max_len=4096)


def test_the_cpu_keeps_its_default_and_an_explicit_size_wins(qwen7b: Path) -> None:
    from personabot.core.settings import load_settings
    from personabot.workers.chat_service import chat_rows

    assert auto_rows(qwen7b, device="cpu", max_len=4096, concurrent_training=False).rows == CPU_ROWS
    assert chat_rows(load_settings(device="cpu"), qwen7b).rows == CPU_ROWS
    explicit = chat_rows(load_settings(max_batch=7, device="cpu"), qwen7b)
    assert explicit.rows == 7 and "PERSONABOT_MAX_BATCH" in explicit.text


def test_a_gpu_memory_cap_is_validated_and_a_no_op_without_a_gpu(qwen7b: Path) -> None:
    from personabot.core.settings import SettingsError, load_settings
    from personabot.workers.chat_service import chat_rows
    from personabot.workers.engine import kv_plan

    with pytest.raises(SettingsError, match="PERSONABOT_GPU_MEMORY_GIB"):
        load_settings(gpu_memory_gib=-1)
    # On the CPU the cap sizes nothing and holds nothing: the CPU default stays, no cap is recorded.
    assert chat_rows(load_settings(device="cpu", gpu_memory_gib=24), qwen7b).rows == CPU_ROWS
    assert kv_plan._cap_bytes == 0


def test_the_bench_sizes_a_24gb_card_as_the_worker_does(tmp_path: Path) -> None:
    from bench.traffic_bench import card_rows

    rows = card_rows(23.6, QWEN25_7B, tmp_path, 4096)
    assert rows == plan_rows(read_shape(tmp_path / "shape"), free_bytes=CARD_24GB, total_bytes=CARD_24GB,
                             max_len=4096).rows
    assert 10 <= rows <= 32
