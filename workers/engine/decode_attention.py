"""Decode attention over each row's own length: a Triton split-KV kernel with GQA on CUDA, plain torch elsewhere.

One decode step per row: the row's new key and value are written into its KV-cache row at
`positions[row]`, and its query attends to keys [0, lengths[row]), the last of which is the new one
(lengths = positions + 1 for every row whose output is read). Lengths and positions are read from
device memory, so one CUDA graph serves every length: the kernel's grid is fixed by the row count,
and each program loops only over the key blocks below its row's length, so a step costs what the
real lengths cost. Layouts: q [rows, heads, head_dim] (head j reads KV head j // group), k and v
[rows, kv_heads, head_dim], caches [cache_rows, kv_heads, max_len, head_dim], out [rows, heads, head_dim].
"""

from __future__ import annotations

import importlib.util
import math

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
BLOCK_N = 64  # keys per inner-loop block
TARGET_PROGRAMS = 512  # split the keys until rows x kv_heads x splits reaches this (H200: 132 SMs)
MAX_SPLITS = 32


def splits_for(rows: int, kv_heads: int) -> int:
    """How many chunks each row's keys are split into (a power of two): many for few rows."""
    wanted = max(1, math.ceil(TARGET_PROGRAMS / (rows * kv_heads)))
    return min(MAX_SPLITS, 1 << (wanted - 1).bit_length())


def kernel_fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The Triton kernel runs here: CUDA, Triton installed, a power-of-two head_dim of at least 16."""
    head_dim = q.shape[-1]
    return (HAS_TRITON and q.is_cuda and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Write k, v at `positions` of cache rows [0, len(q)), then softmax(q K^T / sqrt(d)) V over
    keys [0, lengths[i]) of cache row i."""
    if kernel_fits(q, k_cache) and k.stride(-1) == 1 and v.stride(-1) == 1:
        return _triton_attention(q, k, v, k_cache, v_cache, positions, lengths)
    return torch_attention(q, k, v, k_cache, v_cache, positions, lengths)


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The same step in torch ops. On the CPU it reads keys up to the longest row (one host sync);
    on a GPU, where it must stay capturable, up to the cache's end (the padded cost)."""
    rows, heads, head_dim = q.shape
    row_index = torch.arange(rows, device=q.device)
    k_cache[row_index, :, positions] = k
    v_cache[row_index, :, positions] = v
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    span = k_cache.shape[2] if q.is_cuda else int(lengths.max())
    keys = k_cache[:rows, :, :span].reshape(rows * kv_heads, span, head_dim)
    values = v_cache[:rows, :, :span].reshape(rows * kv_heads, span, head_dim)
    bias = torch.zeros(rows, span, device=q.device, dtype=q.dtype)
    bias.masked_fill_(torch.arange(span, device=q.device)[None, :] >= lengths[:, None], float("-inf"))
    bias = bias[:, None, None, :].expand(rows, kv_heads, 1, span).reshape(rows * kv_heads, 1, span)
    scores = torch.baddbmm(bias, q.reshape(rows * kv_heads, group, head_dim), keys.transpose(1, 2),
                           alpha=1.0 / math.sqrt(head_dim))
    return torch.bmm(torch.softmax(scores, dim=-1), values).view(rows, heads, head_dim)


def _triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    from personabot.workers.engine import decode_kernels

    rows, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    group_pad = max(16, 1 << (group - 1).bit_length())  # tl.dot wants at least 16 rows
    splits = splits_for(rows, kv_heads)
    part_max = torch.empty(rows, kv_heads, splits, group_pad, device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(rows, kv_heads, splits, group_pad, head_dim, device=q.device, dtype=torch.float32)
    out = torch.empty(rows, heads, head_dim, device=q.device, dtype=q.dtype)
    decode_kernels.split_kv[(rows, kv_heads, splits)](
        q, k, v, k_cache, v_cache, positions, lengths, part_max, part_sum, part_acc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), 1.0 / math.sqrt(head_dim),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_N=BLOCK_N, SPLITS=splits,
        num_warps=4, num_stages=2)
    decode_kernels.combine[(rows, kv_heads)](
        part_max, part_sum, part_acc, out, out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, SPLITS=splits, num_warps=4)
    return out
