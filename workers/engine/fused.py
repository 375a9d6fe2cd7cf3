"""The element-wise parts of a LoRA-free decode step, eager or fused by torch.compile."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from personabot.workers.engine.layout import Dims


class FusedParts:
    """A LoRA-free decode step's pieces under torch.compile: everything between two GEMMs (RMSNorm,
    RoPE, the attention softmax, SiLU*mul, residual adds) becomes one kernel; the GEMMs stay cuBLAS
    calls. Compiled on first use (the warm-up before a graph capture), then replayed in the graphs."""

    def __init__(self, d: Dims, compiled: bool = True) -> None:
        """`compiled=False`: the same functions run eagerly (the LoRA-free parts of the eager path)."""
        group = d.heads // d.kv_heads
        scale = 1.0 / math.sqrt(d.head_dim)

        def attn_in(x: torch.Tensor, norm_w: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            n = x.shape[0]
            h = F.rms_norm(x, (d.hidden,), norm_w, d.eps)
            qkv = torch.addmm(qkv_b, h, qkv_w.t())
            qk = qkv[:, :d.q_out + d.kv_out].view(n, d.heads + d.kv_heads, d.head_dim)
            qk = qk * cos + qk.roll(d.head_dim // 2, dims=-1) * sin
            v = qkv[:, d.q_out + d.kv_out:].view(n, d.kv_heads, d.head_dim)
            return qk[:, :d.heads], qk[:, d.heads:], v

        def attn_out(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     x: torch.Tensor, o_w: torch.Tensor) -> torch.Tensor:
            rows = x.shape[0]
            scores = torch.baddbmm(bias, q.reshape(rows * d.kv_heads, group, d.head_dim), keys.transpose(1, 2),
                                   alpha=scale)
            attn = torch.bmm(torch.softmax(scores, dim=-1), values).view(rows, d.q_out)
            return torch.addmm(x, attn, o_w.t())

        def mlp(x: torch.Tensor, norm_w: torch.Tensor, gate_up_w: torch.Tensor,
                down_w: torch.Tensor) -> torch.Tensor:
            h = F.rms_norm(x, (d.hidden,), norm_w, d.eps)
            gu = h @ gate_up_w.t()
            act = F.silu(gu[:, :d.intermediate]) * gu[:, d.intermediate:]
            return torch.addmm(x, act, down_w.t())

        wrap = (lambda fn: torch.compile(fn, fullgraph=True)) if compiled else (lambda fn: fn)
        self.attn_in, self.attn_out, self.mlp = wrap(attn_in), wrap(attn_out), wrap(mlp)
