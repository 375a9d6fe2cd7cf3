"""Where a fast-mode training step's time goes: one micro-batch of 16 through the 7B architecture.

On the GPU box: `python3 bench/train_profile.py --out $OUT` (random bf16 weights, peft LoRA rank 8
all-linear with float32 adapters as ms-swift makes them, liger-kernel's Qwen2 patches when
installed, training/swift_fast.py's lean LoRA). Prints and writes train_profile.json: the CPU time to
issue forward and backward, the GPU time of the whole step, and the kernels that take the most time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_bench import QWEN25_7B  # noqa: E402
from personabot.training import swift_fast  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=300)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    report: dict = {"batch": args.batch, "length": args.length}
    config = Qwen2Config(**QWEN25_7B, torch_dtype="bfloat16")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(model=model)
        report["liger"] = True
    except ImportError:
        report["liger"] = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    ids = torch.randint(0, 150000, (args.batch, args.length), device="cuda")
    mask = torch.ones_like(ids)
    mask[1::2, -40:] = 0  # half the rows padded, as in a length-grouped batch
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :30] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loss = model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        return t1 - t0, t2 - t1, time.perf_counter() - t0

    for lean in (False, True):
        if lean:
            swift_fast.install_lean_lora()
        for _ in range(3):
            step()
        times = [step() for _ in range(5)]
        report[f"lean={lean}"] = {
            "forward_issue_ms": round(1000 * min(t[0] for t in times), 1),
            "backward_issue_ms": round(1000 * min(t[1] for t in times), 1),
            "step_ms": round(1000 * min(t[2] for t in times), 1),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        }
        print(lean, report[f"lean={lean}"], flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    report["kernel_count"] = sum(e.count for e in kernels)
    report["kernel_ms"] = round(sum(e.self_device_time_total for e in kernels) / 1000, 1)
    report["top_kernels"] = [(e.key[:90], e.count, round(e.self_device_time_total / 1000, 2))
                             for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]]
    report["top_cpu_ops"] = [(e.key[:60], e.count, round(e.self_cpu_time_total / 1000, 2))
                             for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1)[:5000])


if __name__ == "__main__":
    main()
