"""The serving engine on CPU: exact greedy match with HF/peft generate, batching, cancel, adapters."""

from __future__ import annotations

import functools
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from personabot.workers.engine import ACTIVE, AdapterRefusedError, EngineError, GenerationDone, GenerationRequest
from personabot.workers.engine.scheduler import HFEngine, load_hf_model
from tests.workers.conftest import make_adapter

PROMPTS = [[5, 6, 7, 8, 9, 10], [100, 200, 300], list(range(20, 60)), [700, 3, 41, 900, 12]]


@pytest.fixture(scope="module", params=[False, True], ids=["lora", "merged"])
def engine(request: pytest.FixtureRequest, tiny_model: Path, tiny_adapter: Path) -> HFEngine:
    """Every engine test runs twice: LoRA applied per step, and a lone adapter merged into the weights."""
    built = HFEngine(lambda: load_hf_model(str(tiny_model), device="cpu"), model_name=str(tiny_model),
                     max_batch=4, max_len=256, lora_slots=3, lora_rank=8, merge=request.param)
    built.load_adapter("v1", tiny_adapter)
    built.set_active("v1")
    yield built
    built.close()


def collect(stream) -> tuple[list[int], GenerationDone]:  # type: ignore[no-untyped-def]
    tokens: list[int] = []
    while True:
        item = stream.next_batch(timeout=60)
        if isinstance(item, GenerationDone):
            return tokens, item
        tokens.extend(item)


@functools.cache
def _hf_model(model_dir: Path, adapter: Path | None):  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter) if adapter is not None else model


def reference(model_dir: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    """HF generate (peft model with the adapter, unmerged), greedy, EOS dropped."""
    model = _hf_model(model_dir, adapter)
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    eos = {model.generation_config.eos_token_id} if isinstance(model.generation_config.eos_token_id, int) \
        else set(model.generation_config.eos_token_id)
    tokens = out[0, len(prompt):].tolist()
    return [t for t in tokens if t not in eos]


def request(prompt: list[int], adapter: str | None = ACTIVE, n: int = 24, **kw) -> GenerationRequest:  # type: ignore[no-untyped-def]
    return GenerationRequest(request_id=f"r{id(prompt)}-{adapter}-{n}", prompt_ids=prompt, max_new_tokens=n,
                             adapter=adapter, **kw)


def test_greedy_matches_hf_generate_in_one_mixed_batch(engine: HFEngine, tiny_model: Path,
                                                       tiny_adapter: Path) -> None:
    before = engine.stats()
    jobs = [(p, a) for p in PROMPTS for a in (ACTIVE, None)]
    streams = [engine.submit(request(p, a)) for p, a in jobs]
    results = [collect(s) for s in streams]
    for (prompt, adapter), (tokens, done) in zip(jobs, results, strict=True):
        expected = reference(tiny_model, tiny_adapter if adapter else None, prompt, 24)
        assert tokens == expected, (prompt, adapter)
        assert done.adapter == ("v1" if adapter else None)
        assert done.finish_reason in ("stop", "length")
    after = engine.stats()
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    # Eight requests, four rows: base and adapter rows shared forward passes.
    assert after["max_batch_seen"] == 4
    assert rows > steps


def test_a_lone_adapter_is_merged_and_gives_the_same_tokens(engine: HFEngine, tiny_model: Path,
                                                              tiny_adapter: Path) -> None:
    before = engine.stats()
    tokens, _ = collect(engine.submit(request(PROMPTS[2], ACTIVE, n=40, min_new_tokens=10**9)))
    assert tokens == reference(tiny_model, tiny_adapter, PROMPTS[2], 40)
    merged = engine.stats()["merges"] - before["merges"]
    assert merged == (1 if engine.decoder.can_merge and engine.decoder.merged_slot is not None else 0)
    assert engine.decoder.can_merge == (engine._merge is True)


def test_merged_step_equals_the_lora_step(tiny_model: Path, tiny_adapter: Path) -> None:
    from personabot.workers.engine.adapter_files import read_adapter
    from personabot.workers.engine.layout import MERGED
    from personabot.workers.engine.qwen2 import Qwen2Decoder

    decoder = Qwen2Decoder(load_hf_model(str(tiny_model), device="cpu"), max_rows=2, max_len=64, lora_slots=2,
                           lora_rank=8, merge=True, fuse=False)
    decoder.write_lora(1, read_adapter(tiny_adapter, decoder.dims, max_rank=8, model_name=str(tiny_model)))
    lora_prefill = decoder.prefill([0], [PROMPTS[2]], [1]).clone()
    decoder.merge(1)
    assert decoder.merged_slot == 1
    assert torch.allclose(decoder.prefill([0], [PROMPTS[2]], [1]), lora_prefill, rtol=1e-4, atol=1e-4)
    for row in (0, 1):
        decoder.prefill([row], [PROMPTS[row]], [1])
        decoder.tokens[row], decoder.positions[row] = 7 + row, len(PROMPTS[row])
    lora = decoder.decode(2, 1).clone()
    merged = decoder.decode(2, MERGED)
    base = decoder.decode(2, None)
    assert torch.allclose(merged, lora, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, lora, rtol=1e-3, atol=1e-3)
    decoder.write_lora(1, read_adapter(tiny_adapter, decoder.dims, max_rank=8, model_name=str(tiny_model)))
    assert decoder.merged_slot is None  # rewriting a slot drops its merged copy


def test_adapter_changes_output(engine: HFEngine) -> None:
    with_adapter, _ = collect(engine.submit(request(PROMPTS[1], ACTIVE)))
    base, _ = collect(engine.submit(request(PROMPTS[1], None)))
    assert with_adapter != base


def test_cancel_frees_the_slot(engine: HFEngine) -> None:
    running = [engine.submit(request(p, None, n=200, min_new_tokens=10**9)) for p in PROMPTS]
    queued = engine.submit(request([1, 2, 3], None, n=200, min_new_tokens=10**9))
    assert running[0].next_batch(timeout=30)
    engine.cancel(queued.request.request_id)
    engine.cancel(running[0].request.request_id)
    _tokens, done = collect(running[0])
    assert done.finish_reason == "cancelled" and done.completion_tokens < 200
    assert collect(queued)[1].finish_reason == "cancelled"
    # The freed row takes a new request while the others are still running.
    late = engine.submit(request([9, 9, 9], None, n=5, min_new_tokens=10**9))
    assert collect(late)[1].completion_tokens == 5
    assert engine.stats()["running"] >= 1
    for stream in running[1:]:
        engine.cancel(stream.request.request_id)
        collect(stream)


def test_prompt_errors(engine: HFEngine) -> None:
    with pytest.raises(EngineError, match="empty"):
        engine.submit(request([], None))
    with pytest.raises(EngineError, match="PERSONABOT_CONTEXT_TOKENS"):
        engine.submit(request(list(range(300)), None))


def test_length_stops_at_context_end(engine: HFEngine) -> None:
    tokens, done = collect(engine.submit(request(list(range(10, 250)), None, n=100, min_new_tokens=10**9)))
    assert done.finish_reason == "length" and len(tokens) == 256 - 240


def test_swap_keeps_running_requests_on_their_adapter(engine: HFEngine, tiny_model: Path,
                                                      tiny_adapter: Path, tiny_adapter_2: Path) -> None:
    old = engine.submit(request(PROMPTS[0], ACTIVE, n=40))
    first = old.next_batch(timeout=30)
    assert isinstance(first, list) and first
    stall_ms = engine.load_adapter("v2", tiny_adapter_2)
    engine.set_active("v2")
    new = engine.submit(request(PROMPTS[0], ACTIVE, n=40))
    try:
        rest, old_done = collect(old)
        old_tokens = first + rest
        new_tokens, new_done = collect(new)
        assert old_done.adapter == "v1" and new_done.adapter == "v2"
        assert new_tokens == reference(tiny_model, tiny_adapter_2, PROMPTS[0], 40)
        assert old_tokens == reference(tiny_model, tiny_adapter, PROMPTS[0], 40)
        assert stall_ms >= 0
        named, named_done = collect(engine.submit(request(PROMPTS[2], "v1", n=10)))
        assert named_done.adapter == "v1"
        assert named == reference(tiny_model, tiny_adapter, PROMPTS[2], 10)
    finally:
        engine.set_active("v1")


def _broken_adapters(tmp: Path, tiny_model: Path, tiny_adapter: Path) -> dict[str, Path]:
    from personabot.training.tiny_model import make_tiny_model

    cases: dict[str, Path] = {}
    other = make_tiny_model(tmp / "other-base", hidden_size=32, heads=2, kv_heads=1, intermediate_size=64)
    wrong = make_adapter(other, tmp / "wrong-base")
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_model)  # same name, other shapes
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    cases["wrong base"] = wrong
    cases["rank"] = make_adapter(tiny_model, tmp / "rank", rank=16)
    cases["targets"] = make_adapter(tiny_model, tmp / "targets", target_modules=["q_proj", "lm_head"])
    garbage = tmp / "garbage"
    shutil.copytree(tiny_adapter, garbage)
    (garbage / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    cases["bad files"] = garbage
    missing = tmp / "missing"
    missing.mkdir()
    cases["missing"] = missing
    renamed = tmp / "renamed"
    shutil.copytree(tiny_adapter, renamed)
    config = json.loads((renamed / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "Qwen/Qwen2.5-7B-Instruct"
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    cases["other model name"] = renamed
    return cases


def test_broken_adapters_are_refused_and_the_old_one_keeps_serving(
        engine: HFEngine, tiny_model: Path, tiny_adapter: Path, tmp_path: Path) -> None:
    expected = reference(tiny_model, tiny_adapter, PROMPTS[3], 12)
    messages = {
        "wrong base": "wrong base model",
        "rank": "PERSONABOT_LORA_MAX_RANK",
        "targets": "lm_head",
        "bad files": "cannot be read",
        "missing": "adapter_config.json",
        "other model name": "retrain",
    }
    for case, path in _broken_adapters(tmp_path, tiny_model, tiny_adapter).items():
        with pytest.raises(AdapterRefusedError, match=messages[case]):
            engine.load_adapter(f"broken-{case}", path)
        assert engine.active == "v1" and not engine.has_adapter(f"broken-{case}")
    tokens, done = collect(engine.submit(request(PROMPTS[3], ACTIVE, n=12)))
    assert tokens == expected and done.adapter == "v1"


def test_release_and_reclaim(tiny_model: Path, tiny_adapter: Path) -> None:
    engine = HFEngine(lambda: load_hf_model(str(tiny_model), device="cpu"), model_name=str(tiny_model),
                      max_batch=2, max_len=128, lora_slots=2, lora_rank=4)
    try:
        engine.load_adapter("v1", tiny_adapter)
        engine.set_active("v1")
        running = engine.submit(request(PROMPTS[0], ACTIVE, n=60, min_new_tokens=10**9))
        releasing = threading.Thread(target=engine.release)
        releasing.start()
        tokens, done = collect(running)  # in-flight work finishes before the model goes
        releasing.join(timeout=60)
        assert len(tokens) == 60 and done.adapter == "v1"
        assert engine.released and engine.active is None
        with pytest.raises(EngineError, match="unloaded"):
            engine.submit(request(PROMPTS[0], None))
        engine.reclaim()
        engine.load_adapter("v1", tiny_adapter)
        engine.set_active("v1")
        again, done = collect(engine.submit(request(PROMPTS[0], ACTIVE, n=10)))
        assert done.adapter == "v1" and again == reference(tiny_model, tiny_adapter, PROMPTS[0], 10)
    finally:
        engine.close()


@pytest.mark.slow
def test_compiled_parts_give_the_eager_step(tiny_model: Path, tiny_adapter: Path) -> None:
    """The torch.compile'd element-wise parts (used for LoRA-free steps on GPUs) compute the same step."""
    from personabot.workers.engine.adapter_files import read_adapter
    from personabot.workers.engine.layout import MERGED
    from personabot.workers.engine.qwen2 import Qwen2Decoder

    results = {}
    for fuse in (False, True):
        decoder = Qwen2Decoder(load_hf_model(str(tiny_model), device="cpu"), max_rows=2, max_len=64,
                               lora_slots=2, lora_rank=8, merge=True, fuse=fuse)
        assert (decoder.fused is not None) == fuse
        decoder.write_lora(1, read_adapter(tiny_adapter, decoder.dims, max_rank=8, model_name=str(tiny_model)))
        decoder.merge(1)
        for row in (0, 1):
            decoder.prefill([row], [PROMPTS[row]], [1])
            decoder.tokens[row], decoder.positions[row] = 7 + row, len(PROMPTS[row])
        results[fuse] = [decoder.decode(2, MERGED).clone(), decoder.decode(2, None).clone(),
                         decoder.decode(1, MERGED).clone()]
    for eager, compiled in zip(results[False], results[True], strict=True):
        assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-5)
