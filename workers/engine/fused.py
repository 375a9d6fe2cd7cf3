"""The element-wise parts of a LoRA-free decode step, eager or fused by torch.compile."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from personabot.workers.engine.layout import Dims


class FusedParts:
    """A LoRA-free decode step's pieces under torch.compile: everything between two GEMMs (RMSNorm,
    RoPE, the bias add, SiLU*mul, residual adds) becomes one kernel; the GEMMs stay cuBLAS calls.
    Compiled once for every row count (dynamic shapes) during the start-up graph captures' warm-ups,
    then replayed in the graphs; attention is decode_attention's kernel."""

    def __init__(self, d: Dims, compiled: bool = True) -> None:
        """`compiled=False`: the same functions run eagerly (the LoRA-free parts of the eager path)."""
        def attn_in(x: torch.Tensor, norm_w: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            n = x.shape[0]
            h = F.rms_norm(x, (d.hidden,), norm_w, d.eps)
            qkv = torch.addmm(qkv_b, h, qkv_w.t())
            qk = qkv[:, :d.q_out + d.kv_out].view(n, d.heads + d.kv_heads, d.head_dim)
            qk = qk * cos + qk.roll(d.head_dim // 2, dims=-1) * sin
            v = qkv[:, d.q_out + d.kv_out:].view(n, d.kv_heads, d.head_dim)
            return qk[:, :d.heads], qk[:, d.heads:], v

        def mlp(x: torch.Tensor, norm_w: torch.Tensor, gate_up_w: torch.Tensor,
                down_w: torch.Tensor) -> torch.Tensor:
            h = F.rms_norm(x, (d.hidden,), norm_w, d.eps)
            gu = h @ gate_up_w.t()
            act = F.silu(gu[:, :d.intermediate]) * gu[:, d.intermediate:]
            return torch.addmm(x, act, down_w.t())

        wrap = (lambda fn: torch.compile(fn, fullgraph=True, dynamic=True)) if compiled else (lambda fn: fn)
        self.attn_in, self.mlp = wrap(attn_in), wrap(mlp)
