"""Read a peft LoRA adapter directory and check that the serving decoder can take it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from personabot.workers.engine.layout import LORA_TARGETS, Dims, LoraWeights
from personabot.workers.engine.protocol import AdapterRefusedError

KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)


def _normalise(name: str) -> str:
    """Compare model names across hubs and local dirs: 'Qwen2___5-7B-Instruct' == 'qwen2.5-7b-instruct'."""
    return re.sub(r"[^a-z0-9]", "", Path(name.rstrip("/")).name.lower())


def same_base(a: str, b: str) -> bool:
    return not a or not b or _normalise(a) == _normalise(b)


def read_adapter(path: str | Path, dims: Dims, *, max_rank: int, model_name: str) -> LoraWeights:
    """Return {(layer, target): (A [r, in], B * scaling [out, r])} or raise AdapterRefusedError."""
    folder = Path(path)
    config_file = folder / "adapter_config.json"
    weights_file = folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise AdapterRefusedError(
            f"{folder}: adapter_config.json and adapter_model.safetensors are required; "
            "save the adapter with peft's save_pretrained (safetensors)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise AdapterRefusedError(f"{config_file}: not valid JSON ({error})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterRefusedError(f"{folder}: peft_type {config.get('peft_type')} is not LORA")
    for flag, what in (("use_dora", "DoRA"), ("rank_pattern", "per-module ranks"),
                       ("alpha_pattern", "per-module alphas"), ("modules_to_save", "modules_to_save")):
        if config.get(flag):
            raise AdapterRefusedError(f"{folder}: {what} is not supported by the chat worker; "
                                      "train a plain LoRA")
    if config.get("bias", "none") != "none":
        raise AdapterRefusedError(f"{folder}: LoRA bias={config['bias']!r} is not supported; use bias='none'")
    base = str(config.get("base_model_name_or_path") or "")
    if not same_base(base, model_name):
        raise AdapterRefusedError(
            f"{folder}: trained on {base!r} but this worker serves {model_name!r}; "
            "retrain the adapter on the served base model")
    rank = int(config.get("r", 8))
    if rank > max_rank:
        raise AdapterRefusedError(
            f"{folder}: rank {rank} is above the chat worker's maximum {max_rank}; "
            "raise PERSONABOT_LORA_MAX_RANK or train with a smaller rank")
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    from safetensors import safe_open

    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                match = KEY.match(key)
                if match is None or match.group(3) not in LORA_TARGETS:
                    raise AdapterRefusedError(
                        f"{folder}: tensor {key} targets a module the chat worker cannot adapt; "
                        f"use target_modules within {', '.join(LORA_TARGETS)}")
                layer, target = int(match.group(1)), match.group(3)
                halves.setdefault((layer, target), {})[match.group(4)] = handle.get_tensor(key)
    except AdapterRefusedError:
        raise
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same refusal
        raise AdapterRefusedError(f"{weights_file}: cannot be read ({type(error).__name__}: {error})") from None
    if not halves:
        raise AdapterRefusedError(f"{weights_file}: holds no LoRA weights")
    weights: LoraWeights = {}
    for (layer, target), pair in sorted(halves.items()):
        if layer >= dims.layers:
            raise AdapterRefusedError(f"{folder}: layer {layer} does not exist in the served model "
                                      f"({dims.layers} layers); wrong base model")
        if set(pair) != {"A", "B"}:
            raise AdapterRefusedError(f"{folder}: layer {layer} {target} lacks lora_A or lora_B")
        a, b = pair["A"], pair["B"]
        in_features, out_features = dims.target_shape(target)
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise AdapterRefusedError(
                f"{folder}: layer {layer} {target} has shapes {tuple(a.shape)}/{tuple(b.shape)}, "
                f"expected ({rank}, {in_features})/({out_features}, {rank}); wrong base model")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterRefusedError(f"{folder}: layer {layer} {target} holds NaN or infinite values")
        weights[(layer, target)] = (a.float(), b.float() * scaling)
    return weights
