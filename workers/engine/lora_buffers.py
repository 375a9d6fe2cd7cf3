"""Writing one adapter into its slot of the LoRA buffers, and merging a slot into the weight copies."""

from __future__ import annotations

import torch

from personabot.workers.engine.layout import LORA_TARGETS, Dims, Layer, LoraWeights


def slot_rows(slot: int, k: int, rank: int) -> slice:
    """The A/B rows of `slot` for a target with k fused parts."""
    width = k * rank
    return slice(slot * width, (slot + 1) * width)


@torch.no_grad()
def write_slot(layers: list[Layer], d: Dims, r: int, slot: int, weights: LoraWeights, *,
               device: torch.device, dtype: torch.dtype) -> None:
    """Copy one adapter into a slot: weights[(layer, target)] = (A [r, in], B*scale [out, r])."""
    qkv_starts = {"q_proj": 0, "k_proj": d.q_out, "v_proj": d.q_out + d.kv_out}
    one, two, three = (slot_rows(slot, k, r) for k in (1, 2, 3))
    for index, layer in enumerate(layers):
        layer.a_qkv[three] = 0
        layer.b_qkv[three] = 0
        layer.a_gu[two] = 0
        layer.b_gu[:, one] = 0
        for a, b in ((layer.a_o, layer.b_o), (layer.a_down, layer.b_down)):
            a[one] = 0
            b[one] = 0
        for target in LORA_TARGETS:
            pair = weights.get((index, target))
            if pair is None:
                continue
            a_w, b_w = (t.to(device, dtype, non_blocking=True) for t in pair)
            rank = a_w.shape[0]
            if target in qkv_starts:
                seg = ("q_proj", "k_proj", "v_proj").index(target)
                cols = slice(three.start + seg * r, three.start + seg * r + rank)
                start = qkv_starts[target]
                layer.a_qkv[cols] = a_w
                layer.b_qkv[cols, start:start + b_w.shape[0]] = b_w.T
            elif target in ("gate_proj", "up_proj"):
                seg = 0 if target == "gate_proj" else 1
                layer.a_gu[two.start + seg * r:two.start + seg * r + rank] = a_w
                layer.b_gu[seg, one.start:one.start + rank] = b_w.T
            elif target == "o_proj":
                layer.a_o[one.start:one.start + rank] = a_w
                layer.b_o[one.start:one.start + rank] = b_w.T
            else:
                layer.a_down[one.start:one.start + rank] = a_w
                layer.b_down[one.start:one.start + rank] = b_w.T


@torch.no_grad()
def merge_slot(layers: list[Layer], d: Dims, r: int, slot: int) -> None:
    """Write W + B A of `slot` into every layer's merged weight copies."""
    base_qkv, inter = d.q_out + 2 * d.kv_out, d.intermediate
    one, two, three = (slot_rows(slot, k, r) for k in (1, 2, 3))
    for layer in layers:
        assert layer.m_qkv_w is not None and layer.m_o_w is not None
        assert layer.m_gate_up_w is not None and layer.m_down_w is not None
        torch.addmm(layer.qkv_w[:base_qkv], layer.b_qkv[three].T, layer.a_qkv[three], out=layer.m_qkv_w)
        torch.addmm(layer.o_w, layer.b_o[one].T, layer.a_o[one], out=layer.m_o_w)
        a_gu = layer.a_gu[two]
        torch.addmm(layer.gate_up_w[:inter], layer.b_gu[0, one].T, a_gu[:r], out=layer.m_gate_up_w[:inter])
        torch.addmm(layer.gate_up_w[inter:2 * inter], layer.b_gu[1, one].T, a_gu[r:],
                    out=layer.m_gate_up_w[inter:])
        torch.addmm(layer.down_w, layer.b_down[one].T, layer.a_down[one], out=layer.m_down_w)
