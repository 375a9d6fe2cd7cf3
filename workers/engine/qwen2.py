"""Qwen2 forward for serving: static KV-cache rows, per-row mixed LoRA, CUDA-graph decode steps.

The weights are the Hugging Face model's own tensors (q/k/v and gate/up fused into one matrix
each). Every batch row owns one KV-cache row; a decode step runs rows [0, bucket) at once, each
row with its own position and its own LoRA slot (a one-hot mask over fixed adapter buffers), so
one step may mix the base model and several adapters. Decode attention reads each row's length from
device memory (decode_attention.py), so on CUDA each (batch bucket, LoRA mode) is one graph, all
captured at start-up (`prepare_graphs`); loading an adapter is an in-place copy into its buffers and
keeps the graphs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from personabot.workers.engine.decode_attention import decode_attention
from personabot.workers.engine.fused import FusedParts
from personabot.workers.engine.graphs import DecodeGraphs
from personabot.workers.engine.kv_plan import gpu_memory
from personabot.workers.engine.layout import MERGED, MIXED, Dims, Layer, LoraMode, LoraWeights, row_buckets
from personabot.workers.engine.lora_buffers import merge_slot, slot_rows, write_slot


@dataclass
class _Group:
    """Prompts of one prefill pass that compute `n` tokens each and share an attention call."""

    size: int  # prompts in the group
    n: int
    tokens: torch.Tensor  # [size * n]: the members' tokens in the pass, member by member
    rows: torch.Tensor | slice | None = None  # KV rows of members over a cached prefix (None: all cold)
    end: int = 0  # keys [0, end) are read from the cache
    seen: torch.Tensor | None = None  # [size, 1, n, end]: which keys each query attends to


def _take(module: torch.nn.Module, name: str) -> torch.Tensor:
    """Detach a parameter from the HF module (so the module no longer keeps it alive)."""
    tensor = getattr(module, name).detach()
    setattr(module, name, None)
    return tensor


class Qwen2Decoder:
    """Holds the weights, KV cache and LoRA buffers; runs prefills and batched decode steps."""

    def __init__(self, model: Any, *, max_rows: int, max_len: int, lora_slots: int,
                 lora_rank: int, use_graphs: bool | None = None, merge: bool | None = None,
                 fuse: bool | None = None) -> None:
        """`merge`: keep a merged copy of the linear weights for the most used adapter (None = on
        CUDA when the GPU has room for it). `fuse`: compile the element-wise parts of a LoRA-free
        decode step with torch.compile (None = on CUDA where Triton is installed)."""
        config = model.config
        if getattr(config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported by the serving decoder")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dims = Dims(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                         head_dim, config.intermediate_size, config.num_hidden_layers,
                         config.vocab_size, config.rms_norm_eps)
        inner = model.model
        self.device = inner.embed_tokens.weight.device
        self.dtype = inner.embed_tokens.weight.dtype
        self.max_rows, self.max_len = max_rows, max_len
        self.lora_slots, self.lora_rank = lora_slots, lora_rank
        d, r, slots = self.dims, lora_rank, lora_slots
        rotary = inner.rotary_emb
        positions = torch.arange(max_len, device=self.device, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.to(self.device, torch.float32)[None, :]
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.cos = (torch.cat((freqs, freqs), dim=-1).cos() * scaling).to(self.dtype)
        # rotate_half(x) * sin == roll(x, half) * [-sin, sin]
        self.sin_signed = (torch.cat((-freqs.sin(), freqs.sin()), dim=-1) * scaling).to(self.dtype)
        self.embed = inner.embed_tokens.weight.detach()
        self.final_norm = inner.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        self.layers: list[Layer] = []

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=self.device, dtype=self.dtype)

        for hf in inner.layers:
            attn, mlp = hf.self_attn, hf.mlp
            qkv_w = torch.cat([_take(attn.q_proj, "weight"), _take(attn.k_proj, "weight"),
                               _take(attn.v_proj, "weight"), zeros(slots * 3 * r, d.hidden)])
            qkv_b = torch.cat([_take(attn.q_proj, "bias"), _take(attn.k_proj, "bias"),
                               _take(attn.v_proj, "bias"), zeros(slots * 3 * r)])
            gate_up_w = torch.cat([_take(mlp.gate_proj, "weight"), _take(mlp.up_proj, "weight"),
                                   zeros(slots * 2 * r, d.hidden)])
            self.layers.append(Layer(
                qkv_w=qkv_w, qkv_b=qkv_b, o_w=_take(attn.o_proj, "weight"), gate_up_w=gate_up_w,
                down_w=_take(mlp.down_proj, "weight"),
                in_norm=_take(hf.input_layernorm, "weight"),
                post_norm=_take(hf.post_attention_layernorm, "weight"),
                a_qkv=qkv_w[d.q_out + 2 * d.kv_out:], b_qkv=zeros(slots * 3 * r, d.q_out + 2 * d.kv_out),
                a_o=zeros(slots * r, d.q_out), b_o=zeros(slots * r, d.hidden),
                a_gu=gate_up_w[2 * d.intermediate:], b_gu=zeros(2, slots * r, d.intermediate),
                a_down=zeros(slots * r, d.intermediate), b_down=zeros(slots * r, d.hidden),
            ))
        cache_shape = (max_rows, d.kv_heads, max_len, d.head_dim)
        self.k_cache = [torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        # Static inputs of a decode step (graphs read them in place).
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self.masks = {k: zeros(max_rows, slots * k * r) for k in (1, 2, 3)}
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        if merge is None:
            merge = self.device.type == "cuda" and self._room_for_merged_copy()
        self.merged_slot: int | None = None
        if merge:
            for layer in self.layers:
                layer.m_qkv_w = torch.zeros_like(layer.qkv_w[:d.q_out + 2 * d.kv_out])
                layer.m_o_w = torch.zeros_like(layer.o_w)
                layer.m_gate_up_w = torch.zeros_like(layer.gate_up_w[:2 * d.intermediate])
                layer.m_down_w = torch.zeros_like(layer.down_w)
        self.can_merge = bool(merge)
        if fuse is None:
            import importlib.util

            fuse = self.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        self.fused = FusedParts(d) if fuse else None
        self.plain = FusedParts(d, compiled=False)
        self.graphs = DecodeGraphs(self._decode) if self.use_graphs else None
        self._logits: torch.Tensor | None = None  # the graphs' shared output, [max_batch, vocab] fp32
        self.warmup_s = 0.0  # the prompt passes of `prepare`

    # --- LoRA slots -----------------------------------------------------------------------------
    def slot_mask(self, slot: int | None, k: int) -> torch.Tensor:
        """[S*k*r] ones over one slot's columns (zeros = base model)."""
        width = self.lora_rank * k
        mask = torch.zeros(self.lora_slots * width, device=self.device, dtype=self.dtype)
        if slot is not None:
            mask[slot * width:(slot + 1) * width] = 1
        return mask

    def set_row_lora(self, row: int, slot: int | None) -> None:
        for k, buffer in self.masks.items():
            buffer[row] = self.slot_mask(slot, k)

    def write_lora(self, slot: int, weights: LoraWeights) -> None:
        """Copy one adapter into a slot: weights[(layer, target)] = (A [r, in], B*scale [out, r])."""
        if self.merged_slot == slot:
            self.merged_slot = None
        write_slot(self.layers, self.dims, self.lora_rank, slot, weights, device=self.device, dtype=self.dtype)

    def _room_for_merged_copy(self) -> bool:
        """The merged copy (every linear weight once more) fits and leaves 8% of the GPU (at least
        4 GiB) for prompt passes and graphs; on a 24 GB card next to a 7B model it never does."""
        size = sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer.qkv_w, layer.o_w, layer.gate_up_w, layer.down_w))
        free, total = gpu_memory(self.device)
        return free - size > max(4 * 2**30, 0.08 * total)

    @torch.no_grad()
    def merge(self, slot: int) -> None:
        """Write W + B A of `slot` into the merged copies; MERGED steps then run that adapter."""
        if not self.can_merge:
            raise RuntimeError("this decoder keeps no merged copy")
        self.merged_slot = None
        merge_slot(self.layers, self.dims, self.lora_rank, slot)
        self.merged_slot = slot

    # --- forward pieces -------------------------------------------------------------------------
    def _rows(self, mode: LoraMode, k: int) -> slice:
        """The A/B rows of the slot `mode` names, for a target with k fused parts."""
        return slot_rows(int(mode), k, self.lora_rank)  # type: ignore[arg-type]

    def _lora(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              mode: LoraMode, masks: dict[int, torch.Tensor]) -> torch.Tensor:
        """out += B(A(x)) in place for a single-part target (o_proj, down_proj)."""
        if mode is None or mode == MERGED:
            return out
        if mode == MIXED:
            return out.addmm_((x @ a.T) * masks[1], b)
        rows = self._rows(mode, 1)
        return out.addmm_(x @ a[rows].T, b[rows])

    def _mlp(self, layer: Layer, x: torch.Tensor, mode: LoraMode, masks: dict[int, torch.Tensor]) -> torch.Tensor:
        if mode == MERGED:
            assert layer.m_gate_up_w is not None and layer.m_down_w is not None
            return self.plain.mlp(x, layer.post_norm, layer.m_gate_up_w, layer.m_down_w)
        d, r = self.dims, self.lora_rank
        h = F.rms_norm(x, (d.hidden,), layer.post_norm, d.eps)
        n = h.shape[0]
        out = h @ layer.gate_up_w.T  # [n, 2I + S*2r]: base gate|up, then every slot's A(h)
        gu = out[:, :2 * d.intermediate]
        if mode is not None:
            tail = out[:, 2 * d.intermediate:]
            if mode == MIXED:
                t = (tail * masks[2]).view(n, self.lora_slots, 2, r).transpose(1, 2)
                t, b = t.reshape(n, 2, self.lora_slots * r).transpose(0, 1), layer.b_gu
            else:
                t = tail[:, self._rows(mode, 2)].view(n, 2, r).transpose(0, 1)
                b = layer.b_gu[:, self._rows(mode, 1)]
            gu3 = torch.baddbmm(gu.view(n, 2, d.intermediate).transpose(0, 1), t, b)
            gate, up = gu3[0], gu3[1]
        else:
            gate, up = gu[:, :d.intermediate], gu[:, d.intermediate:]
        act = F.silu(gate) * up
        x = torch.addmm(x, act, layer.down_w.T)
        return self._lora(x, act, layer.a_down, layer.b_down, mode, masks)

    def _qkv(self, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: LoraMode,
             masks: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections with RoPE applied: q [n, heads, hd], k and v [n, kv_heads, hd]."""
        d = self.dims
        n = x.shape[0]
        h = F.rms_norm(x, (d.hidden,), layer.in_norm, d.eps)
        base = d.q_out + 2 * d.kv_out
        if mode == MERGED:
            assert layer.m_qkv_w is not None
            out = torch.addmm(layer.qkv_b[:base], h, layer.m_qkv_w.T)
        elif mode is None:
            out = torch.addmm(layer.qkv_b[:base], h, layer.qkv_w[:base].T)
        else:
            out = torch.addmm(layer.qkv_b, h, layer.qkv_w.T)  # [n, q|k|v + S*3r]
        qkv = out[:, :base]
        if mode == MIXED:
            qkv.addmm_(out[:, base:] * masks[3], layer.b_qkv)
        elif mode is not None and mode != MERGED:
            rows = self._rows(mode, 3)
            qkv.addmm_(out[:, base:][:, rows], layer.b_qkv[rows])
        qk = qkv[:, :d.q_out + d.kv_out].view(n, d.heads + d.kv_heads, d.head_dim)
        qk = torch.addcmul(qk * cos, qk.roll(d.head_dim // 2, dims=-1), sin)
        v = qkv[:, d.q_out + d.kv_out:].view(n, d.kv_heads, d.head_dim)
        return qk[:, :d.heads], qk[:, d.heads:], v

    @torch.no_grad()
    def prefill(self, rows: list[int], prompts: list[list[int]], slots: list[int | None],
                starts: list[int] | None = None, ends: list[int] | None = None) -> torch.Tensor:
        """Run prompts into their KV rows in one pass; returns the logits of each row's last computed
        token [n, vocab]. `starts[i]`: positions [0, start) of row i already hold this prompt's KV (a
        reused prefix, or the chunks already computed); `ends[i]`: compute only up to there (a chunk;
        default the whole prompt). Positions [start, end) are computed, attending to the cached prefix."""
        d = self.dims
        starts = starts or [0] * len(prompts)
        ends = ends or [len(p) for p in prompts]
        spans = list(zip(prompts, starts, ends, strict=True))
        if any(not 0 <= s < e <= len(p) for p, s, e in spans):
            raise ValueError(f"prefill spans must satisfy 0 <= start < end <= len(prompt): "
                             f"{[(s, e, len(p)) for p, s, e in spans]}")
        lengths = [e - s for _, s, e in spans]
        total = sum(lengths)
        tokens = torch.tensor([t for p, s, e in spans for t in p[s:e]], device=self.device, dtype=torch.long)
        positions = torch.tensor([i for _, s, e in spans for i in range(s, e)], device=self.device)
        row_of = torch.tensor([r for r, n in zip(rows, lengths, strict=True) for _ in range(n)], device=self.device)
        mode: LoraMode = slots[0] if len(set(slots)) == 1 else MIXED
        if mode is not None and mode == self.merged_slot:
            mode = MERGED  # the adapter's merged weights: no LoRA work in the prompt pass either
        masks = {}
        if mode == MIXED:
            counts = torch.tensor(lengths, device=self.device)
            masks = {k: torch.stack([self.slot_mask(s, k) for s in slots]).repeat_interleave(counts, dim=0)
                     for k in (1, 2, 3)}
        groups = self._attention_groups(rows, starts, lengths, positions)
        x = self.embed[tokens]
        cos, sin = self.cos[positions][:, None], self.sin_signed[positions][:, None]
        scale = 1.0 / math.sqrt(d.head_dim)
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin, mode, masks)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            k_cache[row_of, :, positions] = k  # every row's new K/V in one write
            v_cache[row_of, :, positions] = v
            attn = torch.empty(total, d.heads, d.head_dim, device=self.device, dtype=self.dtype)
            for group in groups:
                g, n = group.size, group.n
                queries = q.index_select(0, group.tokens).view(g, n, d.heads, d.head_dim).transpose(1, 2)
                if group.seen is None:  # no cached prefix: plain causal attention over the new tokens
                    keys = k.index_select(0, group.tokens).view(g, n, d.kv_heads, d.head_dim).transpose(1, 2)
                    values = v.index_select(0, group.tokens).view(g, n, d.kv_heads, d.head_dim).transpose(1, 2)
                    out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=True,
                                                         scale=scale)
                else:  # queries at positions [start, end) see keys [0, own position] of their row
                    if isinstance(group.rows, slice):  # consecutive rows (a lone follow-up): a view
                        keys, values = k_cache[group.rows, :, :group.end], v_cache[group.rows, :, :group.end]
                    else:
                        keys = k_cache[:, :, :group.end].index_select(0, group.rows)
                        values = v_cache[:, :, :group.end].index_select(0, group.rows)
                    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.seen,
                                                         enable_gqa=True, scale=scale)
                attn.index_copy_(0, group.tokens, out.transpose(1, 2).reshape(g * n, d.heads, d.head_dim))
            flat = attn.view(total, d.q_out)
            o_w = layer.m_o_w if mode == MERGED else layer.o_w
            x = self._lora(torch.addmm(x, flat, o_w.T), flat, layer.a_o, layer.b_o, mode, masks)
            x = self._mlp(layer, x, mode, masks)
        last = torch.tensor([sum(lengths[:i + 1]) - 1 for i in range(len(lengths))], device=self.device)
        out = F.rms_norm(x[last], (d.hidden,), self.final_norm, d.eps)
        return (out @ self.lm_head.T).float()

    def _attention_groups(self, rows: list[int], starts: list[int], lengths: list[int],
                          positions: torch.Tensor) -> list[_Group]:
        """Rows that compute the same number of tokens share one attention call per layer: cold rows
        (nothing cached) as one causal batch, rows over a cached prefix as one masked batch whose keys
        run to the group's longest end (the mask hides each row's positions past its own query)."""
        by_shape: dict[tuple[int, bool], list[int]] = {}
        for i, (start, n) in enumerate(zip(starts, lengths, strict=True)):
            by_shape.setdefault((n, start > 0), []).append(i)
        offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        groups = []
        for (n, cached), members in by_shape.items():
            tokens = torch.tensor([offsets[i] + j for i in members for j in range(n)], device=self.device)
            if not cached:
                groups.append(_Group(len(members), n, tokens))
                continue
            end = max(starts[i] + n for i in members)
            query_positions = positions[tokens].view(len(members), n)
            seen = torch.arange(end, device=self.device)[None, None, :] <= query_positions[:, :, None]
            kv_rows = [rows[i] for i in members]
            consecutive = kv_rows == list(range(kv_rows[0], kv_rows[0] + len(kv_rows)))
            where = slice(kv_rows[0], kv_rows[-1] + 1) if consecutive else torch.tensor(kv_rows, device=self.device)
            groups.append(_Group(len(members), n, tokens, where, end, seen[:, None]))
        return groups

    @torch.no_grad()
    def copy_prefix(self, source: int, target: int, tokens: int) -> None:
        """Copy the KV of positions [0, tokens) from one row to another (device to device)."""
        for k_cache, v_cache in zip(self.k_cache, self.v_cache, strict=True):
            k_cache[target, :, :tokens] = k_cache[source, :, :tokens]
            v_cache[target, :, :tokens] = v_cache[source, :, :tokens]

    @torch.no_grad()
    def swap_prefix(self, a: int, b: int, tokens: int) -> None:
        """Exchange the KV of positions [0, tokens) between two rows (one layer's row at a time)."""
        for cache in (*self.k_cache, *self.v_cache):
            held = cache[a, :, :tokens].clone()
            cache[a, :, :tokens] = cache[b, :, :tokens]
            cache[b, :, :tokens] = held

    def _decode(self, rows: int, mode: LoraMode) -> torch.Tensor:
        d = self.dims
        tokens, positions = self.tokens[:rows], self.positions[:rows]
        masks = {k: m[:rows] for k, m in self.masks.items()}
        x = self.embed[tokens]
        cos, sin = self.cos[positions][:, None], self.sin_signed[positions][:, None]
        # Keys [0, position] are this step's; a row at max_len - 1 runs no request (the engine parks
        # idle rows there) and attends to one key only: its output is never read.
        lengths = torch.where(positions == self.max_len - 1, 1, positions + 1)
        fused = self.fused if mode is None or mode == MERGED else None
        for index, layer in enumerate(self.layers):
            if fused is not None:
                base = d.q_out + 2 * d.kv_out
                qkv_w = layer.m_qkv_w if mode == MERGED else layer.qkv_w[:base]
                q, k, v = fused.attn_in(x, layer.in_norm, qkv_w, layer.qkv_b[:base], cos, sin)
            else:
                q, k, v = self._qkv(layer, x, cos, sin, mode, masks)
            attn = decode_attention(q, k, v, self.k_cache[index], self.v_cache[index], positions,
                                    lengths).view(rows, d.q_out)
            o_w = layer.m_o_w if mode == MERGED else layer.o_w
            if fused is not None:
                gate_up_w = layer.m_gate_up_w if mode == MERGED else layer.gate_up_w[:2 * d.intermediate]
                down_w = layer.m_down_w if mode == MERGED else layer.down_w
                x = fused.mlp(torch.addmm(x, attn, o_w.T), layer.post_norm, gate_up_w, down_w)
                continue
            x = self._lora(torch.addmm(x, attn, o_w.T), attn, layer.a_o, layer.b_o, mode, masks)
            x = self._mlp(layer, x, mode, masks)
        x = F.rms_norm(x, (d.hidden,), self.final_norm, d.eps)
        logits = x @ self.lm_head.T
        if self._logits is None:
            return logits.float()
        return self._logits[:rows].copy_(logits)

    @torch.no_grad()
    def decode(self, rows: int, mode: LoraMode) -> torch.Tensor:
        """One step for rows [0, rows) reading `tokens`/`positions`; returns logits [rows, vocab]
        (with graphs, a view of one buffer that the next step overwrites)."""
        if self.graphs is None:
            return self._decode(rows, mode)
        return self.graphs.run(rows, mode)

    def lora_modes(self) -> list[LoraMode]:
        """Every LoRA mode a decode step can run in: base, each slot, mixed, and merged where it can merge."""
        return [None, *range(self.lora_slots), MIXED, *([MERGED] if self.can_merge else [])]

    @torch.no_grad()
    def prepare(self, max_batch: int) -> None:
        """On CUDA, before serving: capture the graph of every (rows bucket up to max_batch, LoRA
        mode) decode step, compiling the kernels on the way, then run one short prompt pass per LoRA
        mode (the first of each loads its kernels), so that nothing is captured, compiled or loaded
        once the worker serves. Rows 0 and 1 then hold junk KV (the engine keeps none yet). Called
        once per decoder: the graphs write their logits into one buffer of `max_batch` rows."""
        if self.graphs is None:
            return
        if self._logits is None:
            self._logits = torch.empty(max_batch, self.dims.vocab, device=self.device, dtype=torch.float32)
        self.positions.fill_(self.max_len - 1)  # the warm-ups write K/V only where no kept KV lives
        self.graphs.prepare(row_buckets(max_batch), self.lora_modes())
        started = time.perf_counter()
        prompt = [0] * 16
        for slots in ([None], [0], [None, 0]) if self.lora_slots else ([None],):
            self.prefill(list(range(len(slots))), [prompt] * len(slots), slots)
        if self.can_merge and self.lora_slots:
            self.merge(0)
            self.prefill([0], [prompt], [0])
            self.merged_slot = None
        torch.cuda.synchronize()
        self.warmup_s = time.perf_counter() - started

    @property
    def graph_captures(self) -> int:
        return self.graphs.captures if self.graphs is not None else 0

    @property
    def graph_capture_s(self) -> float:
        return self.graphs.capture_s if self.graphs is not None else 0.0
