"""Triton kernels of the split-KV decode attention (imported only where Triton is installed; see decode_attention)."""
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def split_kv(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, pos_ptr, len_ptr, max_ptr, sum_ptr, acc_ptr,
             stride_qr, stride_qh, stride_knr, stride_knh, stride_vnr, stride_vnh,
             stride_kr, stride_kh, stride_kp, stride_vr, stride_vh, stride_vp, scale,
             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
             SPLITS: tl.constexpr):
    """Program (row, kv_head, split): the GROUP query heads of that KV head against the split's
    share of keys [0, length): cached keys [0, length - 1), then the step's own key, which the
    program holding it also writes into the cache at the row's position. Writes the running max,
    sum and unnormalised output of its share."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + row)
    share = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    start = split * share
    end = tl.minimum(start + share, length)
    cached_end = tl.minimum(end, length - 1)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + row * stride_qr + (kv_head * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)
    k_base = k_ptr + row * stride_kr + kv_head * stride_kh
    v_base = v_ptr + row * stride_vr + kv_head * stride_vh
    run_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    run_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for first in range(start, cached_end, BLOCK_N):
        n = first + tl.arange(0, BLOCK_N)
        valid = n < cached_end
        k = tl.load(k_base + n[:, None] * stride_kp + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(scores, 1))
        alpha = tl.exp(run_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vp + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        run_max = new_max
    if (start < length) & (end == length):  # this share ends with the step's own key
        k_raw = tl.load(kn_ptr + row * stride_knr + kv_head * stride_knh + d)
        v_raw = tl.load(vn_ptr + row * stride_vnr + kv_head * stride_vnh + d)
        score = tl.sum(q.to(tl.float32) * k_raw.to(tl.float32)[None, :], 1) * scale
        new_max = tl.maximum(run_max, score)
        alpha = tl.exp(run_max - new_max)
        p = tl.exp(score - new_max)
        run_sum = run_sum * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_raw.to(tl.float32)[None, :]
        run_max = new_max
        position = tl.load(pos_ptr + row)
        tl.store(k_base + position * stride_kp + d, k_raw)
        tl.store(v_base + position * stride_vp + d, v_raw)
    part = (row * tl.num_programs(1) + kv_head) * SPLITS + split
    tl.store(max_ptr + part * GROUP_PAD + g, run_max)
    tl.store(sum_ptr + part * GROUP_PAD + g, run_sum)
    tl.store(acc_ptr + (part * GROUP_PAD + g)[:, None] * HEAD_DIM + d[None, :], acc)


@triton.jit
def combine(max_ptr, sum_ptr, acc_ptr, out_ptr, stride_or, stride_oh,
            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    """Program (row, kv_head): merge the splits' partial softmaxes into the GROUP heads' outputs."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    first = (row * tl.num_programs(1) + kv_head) * SPLITS
    s = tl.arange(0, SPLITS)
    top = tl.max(tl.load(max_ptr + (first + s)[:, None] * GROUP_PAD + g[None, :]), 0)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for split in range(SPLITS):
        part = first + split
        weight = tl.exp(tl.load(max_ptr + part * GROUP_PAD + g) - top)  # 0 for a split with no keys
        total += tl.load(sum_ptr + part * GROUP_PAD + g) * weight
        acc += tl.load(acc_ptr + (part * GROUP_PAD + g)[:, None] * HEAD_DIM + d[None, :]) * weight[:, None]
    out = acc / total[:, None]
    tl.store(out_ptr + row * stride_or + (kv_head * GROUP + g)[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])
