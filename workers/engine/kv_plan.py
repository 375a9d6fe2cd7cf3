"""How many KV rows (concurrent requests) a chat worker gets when PERSONABOT_MAX_BATCH is 0: sized from the GPU."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
CPU_ROWS = 32  # no GPU to size from: the CPU default
MAX_ROWS = 256  # beyond this a decode step is compute-bound on an H200 and TTFT suffers (bench/RESULTS.md)


class KvPlanError(ValueError):
    """The GPU cannot hold the model and one KV row; the message names what to change."""


@dataclass(frozen=True)
class KvPlan:
    rows: int
    text: str  # the arithmetic, for the worker's ready log


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    weight_bytes: int  # every weight once, in the serving dtype
    linear_bytes: int  # the linear weights a merged adapter copy duplicates

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


def read_shape(model_dir: Path, dtype_bytes: int = 2) -> ModelShape:
    """The sizes that matter for memory, from the model's config.json alone (nothing is loaded)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    linear = layers * (attention + 3 * hidden * inter)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return ModelShape(layers, kv_heads, head_dim, (linear + embeddings) * dtype_bytes, linear * dtype_bytes)


def plan_rows(shape: ModelShape, *, free_bytes: int, total_bytes: int, max_len: int,
              concurrent_training: bool = False, cap: int = MAX_ROWS) -> KvPlan:
    """Rows of `max_len` tokens that fit next to the weights, leaving 8% of the GPU (at least 4 GiB) for
    prompt passes and graphs, and the merged adapter copy when the cap still fits beside it. With
    training on the same GPU (`gpu_share=concurrent`) the KV takes at most half of what is left."""
    row = shape.kv_bytes_per_token() * max_len
    reserve = max(4 * GIB, int(0.08 * total_bytes))
    budget = free_bytes - shape.weight_bytes - reserve
    if concurrent_training:
        budget //= 2
    merged = budget - shape.linear_bytes >= cap * row
    kv_budget = budget - shape.linear_bytes if merged else budget
    rows = min(cap, kv_budget // row) if kv_budget > 0 else 0
    if rows < 1:
        raise KvPlanError(
            f"the GPU has {free_bytes / GIB:.1f} GiB free: the weights ({shape.weight_bytes / GIB:.1f} GiB), "
            f"the {reserve / GIB:.1f} GiB reserve and one KV row of {max_len} tokens ({row / GIB:.2f} GiB) do not "
            "fit; lower PERSONABOT_CONTEXT_TOKENS, set PERSONABOT_GPU_SHARE=release, or use a larger GPU")
    text = (f"{rows} KV rows x {max_len} tokens x {shape.kv_bytes_per_token() / 2**10:.0f} KiB/token = "
            f"{rows * row / GIB:.1f} GiB, of {free_bytes / GIB:.1f} GiB free - weights {shape.weight_bytes / GIB:.1f}"
            f" GiB - reserve {reserve / GIB:.1f} GiB"
            + (" - merged adapter copy " f"{shape.linear_bytes / GIB:.1f} GiB" if merged else
               " (no room for a merged adapter copy)")
            + (", halved for training on the same GPU" if concurrent_training else "")
            + (f"; capped at {cap}" if rows == cap else ""))
    return KvPlan(int(rows), text)


_cap_bytes: int = 0  # PERSONABOT_GPU_MEMORY_GIB in bytes once `limit_gpu_memory` applied it (0 = none)


def limit_gpu_memory(gib: float) -> None:
    """Hold this process to `gib` GiB of the GPU (0 = no limit): torch's allocator refuses more
    (set_per_process_memory_fraction), and `gpu_memory` reports free and total within it, so the KV
    rows and the merged copy are sized as on a card of that size."""
    global _cap_bytes
    if gib <= 0:
        return
    import torch

    if not torch.cuda.is_available():
        return
    total = torch.cuda.mem_get_info()[1]
    cap = int(gib * GIB)
    if cap >= total:
        return
    torch.cuda.set_per_process_memory_fraction(cap / total)
    _cap_bytes = cap


def gpu_memory(device: object = None) -> tuple[int, int]:
    """(free, total) bytes of the GPU, within PERSONABOT_GPU_MEMORY_GIB when it is set: free is then the
    cap less what this process holds, and never more than the GPU really has free."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    if not _cap_bytes:
        return free, total
    return max(0, min(free, _cap_bytes - torch.cuda.memory_reserved(device))), _cap_bytes


def auto_rows(model_dir: Path, *, device: str, max_len: int, concurrent_training: bool) -> KvPlan:
    """The plan for this host, or the CPU default. Sharing the GPU with training at once, it is sized from
    the memory free now (halved); lending the GPU to training (`release`), from the whole GPU, which the
    worker has to itself whenever it serves (it may start while a training run still holds it)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return KvPlan(CPU_ROWS, f"{CPU_ROWS} KV rows (no GPU to size from; PERSONABOT_MAX_BATCH sets it)")
    free, total = gpu_memory()
    return plan_rows(read_shape(model_dir), free_bytes=free if concurrent_training else total, total_bytes=total,
                     max_len=max_len, concurrent_training=concurrent_training)
