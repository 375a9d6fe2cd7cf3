"""Speed patches that `swift sft` loads through `--external_plugins` in the fast and 24gb modes.

ms-swift stays the trainer (its data pipeline, loss, optimizer, schedule, logging and saving);
this file changes three things inside its process, both chosen by measurement (bench/RESULTS.md):

1. Lean LoRA. peft keeps LoRA weights in float32 next to bf16 base weights, so every one of a
   7B model's 196 LoRA linears casts its input to float32, runs the LoRA path in float32 and
   casts the sum back, through five modules' worth of Python. Here one autograd function does
   base + scale * B(A(x)) in the input's dtype, in three GEMMs forward and five backward; the
   LoRA weights stay float32 parameters (the optimizer sees exactly what it saw before) and
   only their tiny bf16 copies enter the GEMMs.
2. No cuDNN attention: its per-shape plan building costs more CPU time than the attention's GPU
   time when every batch has a new length (measured: 124 ms of a 390 ms step).
3. Checkpointing by memory. Instead of recomputing every decoder layer (or none), each
   micro-batch checkpoints the fewest layers that keep its activations under a memory ceiling:
   short batches run with no recompute, the few longest batches recompute some layers. The
   per-token cost is learned from the peaks actually seen; an out-of-memory micro-batch is
   retried once with every layer checkpointed, its gradients restored first.

Configuration comes from the environment variable PERSONABOT_SWIFT_FAST, a JSON object set by
training.runner: {"lean_lora": bool, "cudnn_attention": bool, "adaptive_checkpointing": bool,
"mem_ceiling_gb": float|null}
(null = the GPU's free memory at the first step, less a margin); benchmarks add "step_hook"
("module:Class") and "trace" (the path it is built with) to time the steps. Nothing happens without it, so
importing this file elsewhere (ms-swift replays plugins in dataloader workers) is harmless.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

ENV = "PERSONABOT_SWIFT_FAST"
log = logging.getLogger("personabot.swift_fast")


# --- 1. lean LoRA ----------------------------------------------------------------------------------
class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * (x A^T) B^T with A, B float32 parameters used in x's dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a = lora_a.to(x.dtype)
        b = lora_b.to(x.dtype)
        xa = x2 @ a.t()
        out = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x2, xa, weight, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gb = g @ b  # [M, r]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            grad_x.addmm_(gb, a, alpha=s)
            grad_x = grad_x.view(ctx.shape)
        grad_a = (gb.t() @ x2).mul_(s).to(ctx.param_dtypes[0]) if ctx.needs_input_grad[3] else None
        grad_b = (g.t() @ xa).mul_(s).to(ctx.param_dtypes[1]) if ctx.needs_input_grad[4] else None
        grad_bias = g.sum(0) if ctx.bias_grad else None
        return grad_x, None, grad_bias, grad_a, grad_b, None


def lean_lora_applies(layer: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The active adapter's name when the lean path computes exactly what peft would, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "use_dora", {}).get(name):
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity) and (dropout.training and dropout.p > 0):
        return None
    base = layer.base_layer
    if type(base) is not torch.nn.Linear or base.weight.requires_grad or x.dtype != base.weight.dtype:
        return None
    if not x.is_floating_point() or getattr(layer, "fan_in_fan_out", False):
        return None
    return name


def install_lean_lora() -> bool:
    """Route peft's LoRA Linear forward through LoraLinearFunction where it applies."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return False
    if getattr(Linear.forward, "_personabot_lean", False):
        return True
    original = Linear.forward

    @functools.wraps(original)
    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = lean_lora_applies(self, x, args, kwargs)
        if name is None:
            return original(self, x, *args, **kwargs)
        base = self.base_layer
        return LoraLinearFunction.apply(x, base.weight, base.bias, self.lora_A[name].weight,
                                        self.lora_B[name].weight, float(self.scaling[name]))

    forward._personabot_lean = True  # type: ignore[attr-defined]
    Linear.forward = forward
    return True


# --- 2. checkpointing by memory --------------------------------------------------------------------
@dataclass
class MemoryModel:
    """Activation bytes of a micro-batch of `tokens` padded tokens with `kept` layers not checkpointed.

    bytes = scale * tokens * (kept * per_layer + (layers - kept) * per_ckpt_layer + head)
    `scale` starts cautious and follows the largest ratio of seen to predicted peaks.
    """

    layers: int
    per_layer: float
    per_ckpt_layer: float
    head: float
    scale: float = 1.5
    learned: bool = False

    @classmethod
    def from_config(cls, config: Any, fused_loss: bool) -> MemoryModel:
        hidden = int(config.hidden_size)
        inter = int(getattr(config, "intermediate_size", 4 * hidden))
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", heads)) * (hidden // heads)
        layers = int(config.num_hidden_layers)
        vocab = int(config.vocab_size)
        # bf16 tensors autograd keeps per token in one decoder layer: the MLP's gate, up and
        # product, norms' inputs and outputs, q/k/v and attention output, residuals.
        per_layer = 2.0 * (3 * inter + 8 * hidden + 2 * kv)
        head = 16.0 * hidden if fused_loss else 12.0 * vocab
        return cls(layers=layers, per_layer=per_layer, per_ckpt_layer=2.0 * hidden + 64, head=head)

    def predict(self, tokens: int, kept: int) -> float:
        ckpt = self.layers - kept
        return self.scale * tokens * (kept * self.per_layer + ckpt * self.per_ckpt_layer + self.head)

    def kept_layers(self, tokens: int, budget: float) -> int:
        """The most layers that may keep their activations within `budget` bytes (0..layers)."""
        if tokens <= 0:
            return self.layers
        fixed = self.predict(tokens, 0)
        per_kept = self.scale * tokens * (self.per_layer - self.per_ckpt_layer)
        if per_kept <= 0:
            return self.layers
        return max(0, min(self.layers, math.floor((budget - fixed) / per_kept)))

    def observe(self, tokens: int, kept: int, used: float) -> None:
        """Learn from a finished micro-batch: `used` = peak allocated minus what was there before."""
        if tokens <= 0 or used <= 0:
            return
        ratio = used / (self.predict(tokens, kept) / self.scale)
        new = ratio * 1.08
        self.scale = new if not self.learned else max(self.scale, new)
        self.learned = True


class AdaptiveCheckpointing:
    """Per micro-batch, checkpoint the first `layers - kept` decoder layers (see MemoryModel)."""

    MARGIN = 1.5 * 2**30

    def __init__(self, model: Any, ceiling_gb: float | None, fused_loss: bool,
                 available_bytes: float | None = None) -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        config = _find_config(model)
        self.memory = MemoryModel.from_config(config, fused_loss) if config is not None else None
        if self.memory is not None:
            self.memory.layers = len(self.layers)
        if available_bytes is None:
            free, _total = torch.cuda.mem_get_info()
            available_bytes = torch.cuda.memory_reserved() + free - self.MARGIN
        available = available_bytes
        self.ceiling = available if ceiling_gb is None else min(available, ceiling_gb * 2**30)
        # Non-reentrant: the layers' inputs need not require grad. ms-swift replaces
        # torch.utils.checkpoint.checkpoint with a wrapper that forces its own use_reentrant (True on
        # one GPU), under which the LoRA weights of a checkpointed layer would get no gradient; it
        # keeps the original as `_old_checkpoint`.
        original = getattr(torch.utils.checkpoint, "_old_checkpoint", torch.utils.checkpoint.checkpoint)
        checkpoint = functools.partial(original, use_reentrant=False)
        for layer in self.layers:
            layer._gradient_checkpointing_func = checkpoint
        self.retries = 0
        log.info("adaptive checkpointing: %d layers, ceiling %.1f GB", len(self.layers), self.ceiling / 2**30)

    def plan(self, tokens: int) -> int:
        if self.memory is None or not self.layers:
            return len(self.layers)
        budget = self.ceiling - torch.cuda.memory_allocated()
        return self.memory.kept_layers(tokens, budget)

    def apply(self, kept: int) -> None:
        ckpt = len(self.layers) - kept
        for index, layer in enumerate(self.layers):
            layer.gradient_checkpointing = index < ckpt


def _find_config(model: Any) -> Any:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers") and hasattr(config, "hidden_size"):
            return config
    return None


def _tokens(inputs: Any) -> int:
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def _step_hook(spec: str | None, path: str | None) -> Any:
    """A benchmark's per-step hook: `spec` "module:Class", built with `path`, with `enter() -> float` and
    `exit(started, tokens, kept_layers)` around each training_step (bench/step_trace.py); None without one."""
    if not spec:
        return None
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)(path)


def install_adaptive_checkpointing(ceiling_gb: float | None, step_hook: str | None = None,
                                   trace: str | None = None) -> bool:
    """Wrap transformers.Trainer.training_step (ms-swift's trainers call it for each micro-batch)."""
    if not torch.cuda.is_available():
        return False
    from transformers import Trainer

    if getattr(Trainer.training_step, "_personabot_adaptive", False):
        return True
    original = Trainer.training_step

    @functools.wraps(original)
    def training_step(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        state = getattr(self, "_personabot_ckpt", None)
        if state is None:
            fused = bool(getattr(self.args, "use_liger_kernel", False))
            state = self._personabot_ckpt = AdaptiveCheckpointing(model, ceiling_gb, fused)
        tokens = _tokens(inputs)
        tracer = getattr(self, "_personabot_trace", None)
        if step_hook and tracer is None:
            tracer = self._personabot_trace = _step_hook(step_hook, trace)
        started = tracer.enter() if tracer is not None else 0.0
        kept = state.plan(tokens)
        state.apply(kept)
        grads = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters() if p.requires_grad]
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            loss = original(self, model, inputs, *args, **kwargs)
        except torch.OutOfMemoryError:
            if state.retries >= 3:
                raise
            loss = None  # retried below, once the failed attempt's tensors are gone
        if loss is None:
            state.retries += 1
            for param, grad in grads:
                param.grad = grad
            del grads
            torch.cuda.empty_cache()
            if state.memory is not None:
                state.memory.scale *= 1.5
            log.warning("out of memory at %d tokens with %d layers kept; retrying with all checkpointed",
                        tokens, kept)
            state.apply(0)
            return original(self, model, inputs, *args, **kwargs)
        if state.memory is not None:
            state.memory.observe(tokens, kept, torch.cuda.max_memory_allocated() - before)
        if tracer is not None:
            tracer.exit(started, tokens, kept)
        return loss

    training_step._personabot_adaptive = True  # type: ignore[attr-defined]
    Trainer.training_step = training_step
    return True


def config_from_env() -> dict[str, Any] | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def install(config: dict[str, Any]) -> dict[str, bool]:
    done = {"lean_lora": False, "adaptive_checkpointing": False, "cudnn_attention_off": False}
    if config.get("cudnn_attention") is False and torch.cuda.is_available():
        # cuDNN's fused attention builds an execution plan for every new (batch, length) shape: with
        # length-grouped batches that is every step, about 2 ms of CPU per layer and pass. The
        # memory-efficient SDPA kernel takes the same padding masks without that cost.
        torch.backends.cuda.enable_cudnn_sdp(False)
        done["cudnn_attention_off"] = True
    if config.get("lean_lora"):
        done["lean_lora"] = install_lean_lora()
    if config.get("adaptive_checkpointing"):
        done["adaptive_checkpointing"] = install_adaptive_checkpointing(
            config.get("mem_ceiling_gb"), config.get("step_hook"), config.get("trace"))
    if os.environ.get("PERSONABOT_SWIFT_FAST_QUIET") != "1":
        print(f"personabot swift_fast: {json.dumps(done)}", file=sys.stderr, flush=True)
    return done


def _in_dataloader_worker() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


_config = config_from_env()
if _config is not None and not _in_dataloader_worker():
    install(_config)
