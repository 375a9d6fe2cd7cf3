"""The serving decoder's shapes: model dimensions, one layer's tensors and LoRA buffers, batch buckets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass
class Dims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    eps: float

    @property
    def q_out(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.kv_heads * self.head_dim

    def target_shape(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA target module."""
        return {
            "q_proj": (self.hidden, self.q_out),
            "k_proj": (self.hidden, self.kv_out),
            "v_proj": (self.hidden, self.kv_out),
            "o_proj": (self.q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[target]


@dataclass
class Layer:
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    o_w: torch.Tensor
    gate_up_w: torch.Tensor
    down_w: torch.Tensor
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    # LoRA buffers, slot-major: slot s owns rows [s*k*r, (s+1)*k*r) of an A buffer (k = 3 for
    # q|k|v, 2 for gate|up, 1 otherwise) and the same rows of its B buffer; scaling is in B.
    # The q|k|v and gate|up A buffers are extra rows of the fused base weight, so one GEMM
    # gives the base output and every slot's LoRA down-projection.
    a_qkv: torch.Tensor  # [S*3r, hidden], a view into qkv_w
    b_qkv: torch.Tensor  # [S*3r, q_out + 2 kv_out], block diagonal inside each slot
    a_o: torch.Tensor  # [S*r, q_out]
    b_o: torch.Tensor  # [S*r, hidden]
    a_gu: torch.Tensor  # [S*2r, hidden], a view into gate_up_w
    b_gu: torch.Tensor  # [2, S*r, intermediate]
    a_down: torch.Tensor  # [S*r, intermediate]
    b_down: torch.Tensor  # [S*r, hidden]
    # One adapter merged into copies of the weights (W + B A), or None where merging is off.
    m_qkv_w: torch.Tensor | None = None
    m_o_w: torch.Tensor | None = None
    m_gate_up_w: torch.Tensor | None = None
    m_down_w: torch.Tensor | None = None


MIXED = "mixed"
MERGED = "merged"
# None: base model; int: every row uses that slot; MIXED: per-row masks;
# MERGED: every row uses the slot merged into the weight copies (no LoRA work at all).
LoraMode = int | str | None
# {(layer, target): (A [r, in], B * scaling [out, r])}: one adapter as the decoder takes it.
LoraWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def bucket_of(n: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    for size in buckets:
        if size >= n:
            return size
    return n


def row_buckets(max_batch: int) -> list[int]:
    """Every row count a decode step of a `max_batch` engine runs: min(bucket_of(n), max_batch)."""
    return sorted({min(bucket_of(n), max_batch) for n in range(1, max_batch + 1)})
