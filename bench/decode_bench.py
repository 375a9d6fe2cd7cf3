"""Decode attention bench (issue 13 part 2): the split-KV kernel against the torch path, per-row lengths
against the old padded length bucket, start-up graph capture and one-stream speed (one GPU run).

Run on the GPU box: python3 bench/decode_bench.py --out $OUT
`--tiny` runs the same steps on the CPU with a small model (checks the script, not speed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["PERSONABOT_RETRAIN_CRON"] = ""

from bench.serve_bench import QWEN25_7B, TINY, build_model, run_streams, section
from personabot.workers.engine import decode_attention as attention
from personabot.workers.engine import qwen2
from personabot.workers.engine.graphs import DecodeGraphs
from personabot.workers.engine.layout import MERGED, MIXED
from personabot.workers.engine.scheduler import HFEngine

RESULTS: dict[str, Any] = {}
OLD_LENGTH_BUCKET = 256  # the removed design: keys padded to the next multiple of 256 past the longest row


def padded_attention(span: int):  # type: ignore[no-untyped-def]
    """The old decode attention: every row reads `span` keys, the ones past its length masked out."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        rows, heads, head_dim = q.shape
        row_index = torch.arange(rows, device=q.device)
        k_cache[row_index, :, positions] = k
        v_cache[row_index, :, positions] = v
        kv_heads = k_cache.shape[1]
        keys = k_cache[:rows, :, :span].reshape(rows * kv_heads, span, head_dim)
        values = v_cache[:rows, :, :span].reshape(rows * kv_heads, span, head_dim)
        bias = torch.zeros(rows, span, device=q.device, dtype=q.dtype)
        bias.masked_fill_(torch.arange(span, device=q.device)[None, :] >= lengths[:, None], float("-inf"))
        bias = bias[:, None, None, :].expand(rows, kv_heads, 1, span).reshape(rows * kv_heads, 1, span)
        scores = torch.baddbmm(bias, q.reshape(rows * kv_heads, heads // kv_heads, head_dim), keys.transpose(1, 2),
                               alpha=1.0 / math.sqrt(head_dim))
        return torch.bmm(torch.softmax(scores, dim=-1), values).view(rows, heads, head_dim)
    return attend


def kernel_check(device: str) -> dict[str, Any]:
    """Max abs difference of the Triton kernel against the torch path (fp32 math) at mixed lengths."""
    if not attention.HAS_TRITON or device != "cuda":
        return {"skipped": "no Triton / no GPU"}
    found: dict[str, Any] = {}
    generator = torch.Generator(device="cuda").manual_seed(0)
    for rows, max_len in ((1, 2048), (7, 2048), (32, 2048), (256, 2048), (3, 8192)):
        q = torch.randn(rows, 28, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
        k, v = (torch.randn(rows, 4, 128, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in "kv")
        k_cache = torch.randn(rows + 2, 4, max_len, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
        v_cache = torch.randn_like(k_cache)
        positions = torch.randint(0, max_len - 1, (rows,), device="cuda", generator=generator)
        positions[: min(rows, 5)] = torch.tensor([0, 62, 63, 64, max_len - 2][: min(rows, 5)], device="cuda")
        lengths = positions + 1
        fast_k, fast_v = k_cache.clone(), v_cache.clone()
        fast = attention.decode_attention(q, k, v, fast_k, fast_v, positions, lengths).float()
        slow_k, slow_v = k_cache.float(), v_cache.float()
        slow = attention.torch_attention(q.float(), k.float(), v.float(), slow_k, slow_v, positions, lengths)
        found[f"rows{rows}_len{max_len}"] = {
            "max_abs_diff": float((fast - slow).abs().max()), "splits": attention.splits_for(rows, 4),
            "caches_equal": bool(torch.equal(fast_k.float(), slow_k) and torch.equal(fast_v.float(), slow_v))}
    return found


def step_ms(run, repeat: int = 30) -> float:  # type: ignore[no-untyped-def]
    run()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        run()
    torch.cuda.synchronize()
    return round((time.perf_counter() - started) * 1000 / repeat, 3)


def step_times(engine: HFEngine, device: str) -> dict[str, Any]:
    """GPU time of one decode step (graph replay) at mixed real lengths: per-row lengths vs the padded bucket."""
    decoder = engine.decoder
    assert decoder is not None
    if device != "cuda":
        return {"skipped": "no GPU"}
    found: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(1)
    saved = decoder.positions.clone()
    old_graphs = DecodeGraphs(decoder._decode)
    original = qwen2.decode_attention
    decoder.merge(0)
    try:
        for rows in (1, 32, 256):
            if rows > engine.max_batch:
                continue
            for low, high in ((150, 2000), (150, 400)):
                positions = torch.randint(low, high, (rows,), generator=generator)
                decoder.positions[:rows] = positions.to(decoder.device)
                span = min(decoder.max_len, (int(positions.max()) // OLD_LENGTH_BUCKET + 1) * OLD_LENGTH_BUCKET)
                key = f"rows{rows}_len{low}-{high}"
                entry: dict[str, Any] = {"mean_length": round(float(positions.float().mean()), 1), "old_span": span}
                for label, mode in (("base", None), ("merged", MERGED), ("mixed", MIXED)):
                    new_logits = decoder.decode(rows, mode).clone()
                    entry[f"new_{label}_ms"] = step_ms(lambda: decoder.decode(rows, mode))  # noqa: B023
                    qwen2.decode_attention = padded_attention(span)
                    try:
                        old_graphs._graphs.clear()
                        old_graphs.prepare([rows], [mode])
                        old_logits = old_graphs.run(rows, mode).clone()
                        entry[f"old_{label}_ms"] = step_ms(lambda: old_graphs.run(rows, mode))  # noqa: B023
                    finally:
                        qwen2.decode_attention = original
                    entry[f"{label}_logits_max_abs_diff"] = float((new_logits - old_logits).abs().max())
                found[key] = entry
                print(key, entry, flush=True)
    finally:
        qwen2.decode_attention = original
        decoder.positions.copy_(saved)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--tiny", action="store_true", help="small model on the CPU: checks the script only")
    parser.add_argument("--max-batch", type=int, default=256)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    dims = TINY if args.tiny else QWEN25_7B
    import peft
    import transformers

    RESULTS["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "python": sys.version.split()[0],
                           "triton": __import__("triton").__version__ if attention.HAS_TRITON else None,
                           "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}

    def save() -> None:
        (out / "decode_bench.json").write_text(json.dumps(RESULTS, indent=2))

    def record(name: str, fn):  # type: ignore[no-untyped-def]
        value = section(name, out)(fn)()
        RESULTS[name] = value
        save()
        return value

    from bench import serve_bench

    serve_bench.RESULTS = RESULTS  # section() records into it
    record("kernel_vs_torch", lambda: kernel_check(device))
    model = build_model(dims, device, torch.bfloat16 if device == "cuda" else torch.float32)
    started = time.perf_counter()
    engine = HFEngine(lambda: model, model_name="qwen2.5-7b-random", max_batch=args.max_batch, max_len=2048,
                      lora_slots=3, lora_rank=32, merge=None if device == "cuda" else True)
    stats = engine.stats()
    RESULTS["startup"] = {"engine_build_s": round(time.perf_counter() - started, 2), "graphs": stats["graphs"],
                          "graph_capture_s": stats["graph_capture_s"], "sizing": engine.sizing,
                          "max_batch": args.max_batch, "max_len": 2048, "can_merge": engine.decoder.can_merge,
                          "fused": engine.decoder.fused is not None,
                          "gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)
                          if device == "cuda" else None}
    print(RESULTS["startup"], flush=True)
    save()
    new = 256 if device == "cuda" else 16
    record("one_stream_base", lambda: run_streams(engine, 1, 128, new, seed=1, adapters=(None,)))
    record("one_stream_base_again", lambda: run_streams(engine, 1, 128, new, seed=2, adapters=(None,)))
    record("32_streams_base", lambda: run_streams(engine, 32, 128, new, seed=3, adapters=(None,)))
    RESULTS["graphs_after_serving"] = engine.stats()["graphs"]
    save()
    record("decode_step_ms", lambda: step_times(engine, device))
    engine.close()
    save()


if __name__ == "__main__":
    main()
