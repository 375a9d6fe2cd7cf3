"""Serving benchmark: our engine vs plain peft generate, bare and through Celery (one GPU run).

Run on the GPU box (see bench/RESULTS.md, Serving):
    python3 bench/serve_bench.py --out $OUT
`--tiny` runs the same steps on the CPU with a small model (checks the script, not speed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["PERSONABOT_RETRAIN_CRON"] = ""  # the GPU box has no croniter; no schedule is needed here

from bench.serve_celery import measure_celery_path, p95, prompt
from personabot.workers.engine import ACTIVE, GenerationDone, GenerationRequest
from personabot.workers.engine.graphs import DecodeGraphs
from personabot.workers.engine.layout import MERGED
from personabot.workers.engine.scheduler import HFEngine

QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
             "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": False}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 4096,
        "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
RESULTS: dict[str, Any] = {}


def save(out: Path) -> None:
    (out / "serve_bench.json").write_text(json.dumps(RESULTS, indent=2))


def section(name: str, out: Path):  # type: ignore[no-untyped-def]
    """Decorator: run a step, record its result or its error, keep going."""
    def wrap(fn):  # type: ignore[no-untyped-def]
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                value = fn(*args, **kwargs)
                RESULTS[name] = value if value is not None else "ok"
                return value
            except Exception as error:  # noqa: BLE001 - a failed step is reported, not fatal
                RESULTS[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-3000:]}
                print(f"[{name}] FAILED: {error}", flush=True)
                return None
            finally:
                RESULTS.setdefault("step_seconds", {})[name] = round(time.perf_counter() - started, 2)
                print(f"[{name}] {time.perf_counter() - started:.1f}s", flush=True)
                save(out)
        return run
    return wrap


def word_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    """A tokenizer whose every id decodes to a word 't<id>' (random weights emit any id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from personabot.training.tiny_model import CHAT_TEMPLATE

    specials = {"<|endoftext|>": vocab_size - 3, "<|im_start|>": vocab_size - 2, "<|im_end|>": vocab_size - 1}
    vocab = {f"t{i}": i for i in range(vocab_size - 3)}
    vocab["[UNK]"] = 0
    vocab.update(specials)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast, specials


def build_model(dims: dict[str, Any], device: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    vocab = dims["vocab_size"]
    config = Qwen2Config(**dims, bos_token_id=vocab - 3, eos_token_id=vocab - 1, pad_token_id=vocab - 3)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(eos_token_id=[vocab - 1, vocab - 3], pad_token_id=vocab - 3,
                                               bos_token_id=vocab - 3, do_sample=False)
    return model.eval()


def add_lora(model, seed: int):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
                                autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, tensor in peft_model.named_parameters():
            if "lora_B" in name:
                tensor.normal_(std=0.02)
    return peft_model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peer_generate(peft_model, batch: int, prompt_len: int, new: int, device: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    ids = torch.randint(10, 1000, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    peft_model.generate(input_ids=ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=4, min_new_tokens=4,
                        do_sample=False)
    sync(device)
    started = time.perf_counter()
    peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    sync(device)
    seconds = time.perf_counter() - started
    return {"streams": batch, "prompt_tokens": prompt_len, "new_tokens": new, "seconds": round(seconds, 3),
            "tok_s": round(batch * new / seconds, 1)}


def collect(stream) -> tuple[list[int], GenerationDone, list[float]]:  # type: ignore[no-untyped-def]
    tokens: list[int] = []
    times: list[float] = []
    while True:
        item = stream.items.get(timeout=300)
        if isinstance(item, GenerationDone):
            return tokens, item, times
        tokens.extend(item)
        times.append(time.monotonic())


def run_streams(engine: HFEngine, streams: int, prompt_len: int, new: int, seed: int = 0,
                adapters: tuple[str | None, ...] = (ACTIVE,)) -> dict[str, Any]:
    started = time.monotonic()
    handles = [engine.submit(GenerationRequest(f"s{seed}-{i}", prompt(prompt_len, seed + i), new,
                                               adapter=adapters[i % len(adapters)], min_new_tokens=10**9))
               for i in range(streams)]
    results = [collect(h) for h in handles]
    seconds = time.monotonic() - started
    tokens = sum(len(r[0]) for r in results)
    ttft = [h.first_token_at - h.submitted_at for h in handles]
    last_first = max(h.first_token_at for h in handles)
    decode_window = max(r[2][-1] for r in results) - last_first
    decode_tokens = sum(sum(1 for t in r[2] if t > last_first) for r in results)
    return {"streams": streams, "prompt_tokens": prompt_len, "new_tokens": new, "seconds": round(seconds, 3),
            "tok_s": round(tokens / seconds, 1), "decode_tok_s": round(decode_tokens / max(decode_window, 1e-9), 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1), "ttft_max_ms": round(1000 * max(ttft), 1),
            "errors": sum(1 for r in results if r[1].finish_reason not in ("length", "stop"))}


def closed_loop(engine: HFEngine, streams: int, prompt_len: int, new: int, seconds: float,
                during=None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """`streams` clients, each sending its next request when the last one ends, for `seconds`.

    Reply lengths vary (new/2 .. 3*new/2) and clients start at spread-out times, so arrivals are
    staggered as in real traffic; wave 0 is each client's first request.
    """
    stop = time.monotonic() + seconds
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        n = 0
        rng = torch.Generator().manual_seed(index)
        time.sleep(index * 0.6 / streams)
        while time.monotonic() < stop:
            length = int(torch.randint(max(1, new // 2), new + new // 2 + 1, (1,), generator=rng))
            handle = engine.submit(GenerationRequest(f"c{index}-{n}", prompt(prompt_len, index * 1000 + n), length,
                                                     adapter=ACTIVE, min_new_tokens=10**9))
            tokens, done, times = collect(handle)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            with lock:
                records.append({"wave": n, "ttft": handle.first_token_at - handle.submitted_at,
                                "tokens": len(tokens), "finish": done.finish_reason, "adapter": done.adapter,
                                "expected": length,
                                "max_gap": max(gaps) if gaps else 0.0, "times": times})
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    extra = during() if during else None
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    steady = [r["ttft"] for r in records if r["wave"] > 0]
    burst = [r["ttft"] for r in records if r["wave"] == 0]
    all_gaps = sorted(g for r in records for g in
                      [b - a for a, b in zip(r["times"], r["times"][1:], strict=False)])
    result = {"streams": streams, "prompt_tokens": prompt_len, "new_tokens": new, "requests": len(records),
              "tok_s": round(sum(r["tokens"] for r in records) / wall, 1),
              "ttft_p95_ms_steady": round(1000 * p95(steady), 1) if steady else None,
              "ttft_p50_ms_steady": round(1000 * statistics.median(steady), 1) if steady else None,
              "ttft_p95_ms_first_wave_all_at_once": round(1000 * p95(burst), 1) if burst else None,
              "inter_token_gap_p50_ms": round(1000 * statistics.median(all_gaps), 2) if all_gaps else None,
              "inter_token_gap_max_ms": round(1000 * all_gaps[-1], 2) if all_gaps else None,
              "failed": sum(1 for r in records if r["finish"] != "length" or r["tokens"] != r["expected"]),
              "adapters_seen": sorted({str(r["adapter"]) for r in records})}
    if extra is not None:
        result.update(extra)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--tiny", action="store_true", help="small model on the CPU: checks the script only")
    parser.add_argument("--skip-celery", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    dims = TINY if tiny else QWEN25_7B
    work = Path("/tmp/serve-bench")
    model_dir = work / "Qwen2.5-7B-Instruct"
    scale = 0.1 if tiny else 1.0
    import peft
    import transformers

    RESULTS["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "python": sys.version.split()[0],
                           "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    tokenizer, specials = word_tokenizer(dims["vocab_size"])
    model = build_model(dims, device, dtype)
    peft_model = add_lora(model, seed=1)

    @section("peer_peft_generate", out)
    def peer() -> dict[str, Any]:
        one = peer_generate(peft_model, 1, 128, max(8, int(128 * scale)), device)
        many = peer_generate(peft_model, 32, 128, max(8, int(128 * scale)), device)
        return {"one_stream": one, "32_streams": many}

    peer()
    check_prompts = [prompt(64, 7), prompt(300, 8)]
    with torch.no_grad():
        reference = [peft_model.generate(input_ids=torch.tensor([p], device=device), max_new_tokens=32,
                                         do_sample=False)[0, len(p):].tolist() for p in check_prompts]
        reference_logits = [peft_model(input_ids=torch.tensor([p], device=device)).logits[0, -1].float()
                            for p in check_prompts]
    work.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(work / "adapter-a")
    second = add_lora(peft_model.unload(), seed=2)
    second.save_pretrained(work / "adapter-b")
    base = second.unload()

    @section("save_base_for_celery", out)
    def save_base() -> dict[str, Any]:
        if args.skip_celery:
            return {"skipped": True}
        started = time.perf_counter()
        base.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        return {"seconds": round(time.perf_counter() - started, 1)}

    save_base()
    for name in ("adapter-a", "adapter-b"):
        config_file = work / name / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = str(model_dir)
        config_file.write_text(json.dumps(config))
    engine = HFEngine(lambda: base, model_name=str(model_dir), max_batch=32, max_len=2048, lora_slots=3,
                      lora_rank=32, eos_ids=tuple(specials.values()))
    RESULTS["engine_settings"] = {"max_batch": 32, "max_len": 2048, "lora_slots": 3, "lora_max_rank": 32,
                                  "cuda_graphs": engine.decoder.use_graphs}
    engine.load_adapter("a", work / "adapter-a")
    engine.set_active("a")

    @section("greedy_vs_peft_generate", out)
    def agree() -> dict[str, Any]:
        matched = []
        for p, ref in zip(check_prompts, reference, strict=True):
            ours_tokens, _, _ = collect(engine.submit(GenerationRequest("check", p, len(ref), adapter=ACTIVE,
                                                                        min_new_tokens=10**9)))
            same = next((i for i, (a, b) in enumerate(zip(ours_tokens, ref, strict=False)) if a != b), len(ref))
            matched.append(same)
        decoder, slot = engine.decoder, engine.slots.index("a")
        errors = {"prefill": [], "graph_decode_step": []}
        with torch.no_grad():
            for p, ref in zip(check_prompts, reference_logits, strict=True):
                ours_logits = decoder.prefill([0], [p], [slot])[0]
                errors["prefill"].append(float((ours_logits - ref).norm() / ref.norm()))
                decoder.prefill([0], [p[:-1]], [slot])
                decoder.set_row_lora(0, slot)
                decoder.tokens[0], decoder.positions[0] = p[-1], len(p) - 1
                step = decoder.decode(1, slot)[0].clone()
                decoder.positions[0] = 0
                errors["graph_decode_step"].append(float((step - ref).norm() / ref.norm()))
        return {"tokens_compared": [len(r) for r in reference], "matching_prefix": matched,
                "logits_rel_error_vs_peft": {k: [round(e, 5) for e in v] for k, v in errors.items()},
                "note": "bf16 random weights give near-flat logits: one near-tie flips an argmax and the "
                        "greedy sequences diverge after it; the CPU fp32 tests match token for token"}

    agree()

    @section("ours_warmup", out)
    def warm() -> dict[str, Any]:
        sizes = (1, 2, 4, 8, 12, 16, 24, 32)
        for name in ("w1", "w2", "a"):  # every slot, the base model and mixed batches (graphs are ready at start-up)
            engine.load_adapter(name, work / "adapter-b")
            engine.set_active(name)
            for streams in sizes:
                run_streams(engine, streams, 128, 40 if not tiny else 8, seed=99)
            run_streams(engine, 32, 500, 300 if not tiny else 8, seed=98)
        for streams in sizes:
            run_streams(engine, streams, 128, 40 if not tiny else 8, seed=97, adapters=(None,))
            run_streams(engine, max(2, streams), 128, 40 if not tiny else 8, seed=96, adapters=(ACTIVE, None))
        run_streams(engine, 32, 500, 300 if not tiny else 8, seed=95, adapters=(ACTIVE, None))
        return {"graphs": engine.stats()["graphs"]}

    warm()

    @section("ours_engine", out)
    def ours() -> dict[str, Any]:
        new = max(8, int(256 * scale))
        return {"one_stream": run_streams(engine, 1, 128, new, seed=1),
                "32_streams": run_streams(engine, 32, 128, new, seed=2),
                "one_stream_base_model": run_streams(engine, 1, 128, new, seed=3, adapters=(None,)),
                "32_streams_mixed_base_and_adapter": run_streams(engine, 32, 128, new, seed=4,
                                                                 adapters=(ACTIVE, None))}

    ours()

    @section("decode_step_gpu_ms", out)
    def step_times() -> dict[str, Any]:
        decoder = engine.decoder
        timings: dict[str, Any] = {"merged_slot": decoder.merged_slot, "fused": decoder.fused is not None}
        slot = engine.slots.index(engine.active)
        if decoder.can_merge and decoder.merged_slot != slot:
            decoder.merge(slot)

        def timed(rows: int, mode: Any) -> float:
            decoder.decode(rows, mode)
            sync(device)
            started = time.perf_counter()
            for _ in range(20):
                decoder.decode(rows, mode)
            sync(device)
            return round((time.perf_counter() - started) * 1000 / 20, 3)

        modes = [("base", None), ("one_adapter", slot), ("mixed", "mixed")]
        if decoder.can_merge:
            modes.append(("one_adapter_merged", MERGED))
        for rows in (1, 32):
            for label, mode in modes:
                timings[f"rows{rows}_{label}"] = timed(rows, mode)
        if decoder.fused is not None:
            # The same LoRA-free steps without the compiled parts, in the same process (the peer).
            fused, graphs = decoder.fused, decoder.graphs
            decoder.fused = None
            decoder.graphs = DecodeGraphs(decoder._decode) if graphs is not None else None
            if decoder.graphs is not None:
                decoder.graphs.prepare([1, 32], [mode for _, mode in modes if mode is None or mode == MERGED])
            try:
                for rows in (1, 32):
                    for label, mode in modes:
                        if mode is None or mode == MERGED:
                            timings[f"rows{rows}_{label}_not_fused"] = timed(rows, mode)
            finally:
                decoder.fused, decoder.graphs = fused, graphs
        if device == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                decoder._decode(1, MERGED if decoder.can_merge else slot)
                sync(device)
            events = prof.key_averages()
            timings["eager_rows1_kernels"] = sum(e.count for e in events)
            timings["eager_rows1_kernel_ms"] = round(sum(e.device_time_total for e in events) / 1000, 3)
            timings["eager_rows1_top"] = [(e.key[:60], e.count, round(e.device_time_total / 1000, 3))
                                          for e in sorted(events, key=lambda e: -e.device_time_total)[:12]]
        return timings

    step_times()

    @section("ours_ttft_32_streams_500_prompt", out)
    def ttft() -> dict[str, Any]:
        return closed_loop(engine, 32, 500, max(8, int(128 * scale)), 8.0 if not tiny else 2.0)

    ttft()

    @section("ours_swaps_under_load", out)
    def swaps() -> dict[str, Any]:
        def swapper() -> dict[str, Any]:
            time.sleep(1.0)
            stalls, failures = [], []
            for i in range(20):
                name = f"v{i}"
                try:
                    stalls.append(engine.load_adapter(name, work / ("adapter-b" if i % 2 == 0 else "adapter-a")))
                    engine.set_active(name)
                except Exception as error:  # noqa: BLE001 - counted
                    failures.append(f"{type(error).__name__}: {error}")
                time.sleep(0.4)
            return {"swaps": len(stalls), "swap_failures": failures,
                    "stall_ms_max": round(max(stalls), 2) if stalls else None,
                    "stall_ms_median": round(statistics.median(stalls), 2) if stalls else None}

        return closed_loop(engine, 32, 128, max(8, int(64 * scale)), 11.0 if not tiny else 4.0, during=swapper)

    swaps()
    RESULTS["engine_stats"] = engine.stats()
    engine.close()
    if device == "cuda":
        torch.cuda.empty_cache()
    save(out)
    if not args.skip_celery:
        section("celery_path", out)(measure_celery_path)(work, model_dir, out / "celery_worker.log", tiny, scale)
    save(out)
    print(json.dumps({k: v for k, v in RESULTS.items() if k != "celery_worker_log"}, indent=1)[:6000])


if __name__ == "__main__":
    main()
