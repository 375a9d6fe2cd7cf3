"""training/swift_fast.py: the lean LoRA path computes what peft computes; checkpointing by memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from personabot.training import swift_fast
from personabot.training.swift_fast import AdaptiveCheckpointing, LoraLinearFunction, MemoryModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(model_dir: Path, dtype: torch.dtype, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a LoRA path that changes the output
    model.train()
    return model


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def _batch(vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 17), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture()
def restore_peft_forward(monkeypatch):
    from peft.tuners.lora.layer import Linear

    monkeypatch.setattr(Linear, "forward", Linear.forward)


def test_lean_lora_gives_peft_loss_and_gradients(tiny_model: Path, restore_peft_forward, monkeypatch) -> None:
    model = _peft_model(tiny_model, torch.float32)
    batch = _batch(model.config.vocab_size)
    loss_ref, grads_ref = _loss_and_grads(model, batch)

    calls = []
    apply = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    assert swift_fast.install_lean_lora()
    loss, grads = _loss_and_grads(model, batch)

    layers = model.config.num_hidden_layers
    assert len(calls) == 7 * layers  # every LoRA linear took the lean path
    assert torch.allclose(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) == 14 * layers
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ref[name], rtol=1e-4, atol=1e-6), name


def test_lean_lora_keeps_float32_adapter_weights_under_a_bf16_base(tiny_model: Path, restore_peft_forward) -> None:
    model = _peft_model(tiny_model, torch.bfloat16)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # peft's default upcast
    batch = _batch(model.config.vocab_size)
    loss_ref, grads_ref = _loss_and_grads(model, batch)
    swift_fast.install_lean_lora()
    loss, grads = _loss_and_grads(model, batch)
    assert abs(loss.item() - loss_ref.item()) < 0.02 * abs(loss_ref.item())
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(grad.flatten(), grads_ref[name].flatten(), dim=0)
        assert cos > 0.99, (name, cos)


def test_lean_lora_leaves_dropout_and_disabled_adapters_to_peft(tiny_model: Path, restore_peft_forward,
                                                                monkeypatch) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    swift_fast.install_lean_lora()
    calls = []
    apply = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.1))
    model.train()
    batch = _batch(model.config.vocab_size)
    model(**batch).loss.backward()
    assert calls == []  # dropout > 0: peft's own path
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert calls  # dropout is a no-op in eval: lean path
    calls.clear()
    with model.disable_adapter(), torch.no_grad():
        model(**batch)
    assert calls == []


QWEN25_7B = type("Config", (), {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                                "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064})


def test_memory_model_checkpoints_only_long_micro_batches() -> None:
    memory = MemoryModel.from_config(QWEN25_7B, fused_loss=True)
    budget = 100 * 2**30  # 100 GB for activations
    assert memory.kept_layers(16 * 300, budget) == 28  # a typical batch: no recompute
    long = memory.kept_layers(16 * 1529, budget)
    assert 0 < long < 28  # the longest: some layers recomputed
    assert memory.predict(16 * 1529, long) <= budget < memory.predict(16 * 1529, long + 1)
    assert memory.kept_layers(16 * 1529, 1 * 2**30) == 0
    # without the fused loss the logits dominate and leave less room
    assert MemoryModel.from_config(QWEN25_7B, fused_loss=False).kept_layers(16 * 1529, budget) < long


def test_memory_model_learns_from_seen_peaks() -> None:
    memory = MemoryModel.from_config(QWEN25_7B, fused_loss=True)
    raw = memory.predict(4000, 28) / memory.scale
    memory.observe(4000, 28, used=0.5 * raw)  # the first peak: half the formula
    assert memory.scale == pytest.approx(0.54)
    memory.observe(4000, 28, used=0.4 * raw)  # a smaller one never lowers it again
    assert memory.scale == pytest.approx(0.54)
    memory.observe(4000, 28, used=0.8 * raw)
    assert memory.scale == pytest.approx(0.864)


def _force_reentrant_like_ms_swift(monkeypatch) -> None:
    """ms-swift's Trainer._fix_gradient_checkpointing: checkpoint() always reentrant on one GPU."""
    import torch.utils.checkpoint as ckpt

    old = ckpt.checkpoint

    def forced(*args, use_reentrant=None, **kwargs):
        return old(*args, use_reentrant=True, **kwargs)

    monkeypatch.setattr(ckpt, "_old_checkpoint", old, raising=False)
    monkeypatch.setattr(ckpt, "checkpoint", forced)


@pytest.mark.parametrize("swift_patched", [False, True], ids=["plain", "ms-swift-patched-checkpoint"])
def test_checkpointing_some_layers_keeps_the_gradients(tiny_model: Path, swift_patched: bool, monkeypatch) -> None:
    if swift_patched:
        _force_reentrant_like_ms_swift(monkeypatch)
    model = _peft_model(tiny_model, torch.float32)
    batch = _batch(model.config.vocab_size)
    loss_ref, grads_ref = _loss_and_grads(model, batch)
    state = AdaptiveCheckpointing(model, ceiling_gb=None, fused_loss=False, available_bytes=2**30)
    assert len(state.layers) == model.config.num_hidden_layers
    recomputed = []
    for layer in state.layers:
        func = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=func, **k: recomputed.append(1) or _f(*a, **k)
    state.apply(kept=1)
    assert [layer.gradient_checkpointing for layer in state.layers] == [True] * (len(state.layers) - 1) + [False]
    loss, grads = _loss_and_grads(model, batch)
    assert len(recomputed) == len(state.layers) - 1
    assert torch.allclose(loss, loss_ref)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ref[name], rtol=1e-5, atol=1e-7), name
    state.apply(kept=len(state.layers))
    assert not any(layer.gradient_checkpointing for layer in state.layers)


@pytest.mark.slow
def test_fast_mode_ends_at_the_seeds_final_loss_on_the_same_data(tiny_model: Path, general_file: Path,
                                                                  tmp_path: Path) -> None:
    """Both speed modes train the whole schedule on the same data through real `swift sft`; the fast
    mode (micro-batch 16, no dropout, length grouping, the plugin) ends at an equal or lower loss."""
    from personabot.core.train_params import TrainParams
    from personabot.training.dataset import PersonaData, write_training_set
    from personabot.training.runner import run_sft, sft_command, sft_env
    from tests.conftest import subprocess_env

    persona = PersonaData(name="Nova", author="Acme Lab", system_prompt="You are {name}.", pairs=[])
    finals = {}
    for mode in ("seeds", "fast"):
        params = TrainParams(epochs=10, speed_mode=mode, learning_rate=1e-2, identity_oversample=1, faq_oversample=1,
                             min_identity_pairs=30, general_data=[f"{general_file}#5"])
        built = write_training_set(persona, params, tmp_path / mode / "data")
        out = tmp_path / mode / "out"
        command = sft_command(model=str(tiny_model), dataset_args=built.dataset_args, output_dir=out,
                              params=params, system=built.system_prompt, torch_dtype="float32",
                              dataloader_workers=0)
        env = {**subprocess_env(OMP_NUM_THREADS="2"), **sft_env(params)}
        result = run_sft(command, out, out / "train.log", env=env)
        assert ("swift_fast" in (out / "train.log").read_text()) == (mode == "fast")
        last_epoch = [p["loss"] for p in result.points if p["epoch"] > 9]
        finals[mode] = sum(last_epoch) / len(last_epoch)
        assert result.points[-1]["step"] == result.points[-1]["max_steps"]
    first = result.points[0]["loss"]
    print(f"first loss {first:.3f}, final {finals}")
    assert finals["fast"] < 0.95 * first, (first, finals)  # training moved the loss
    assert finals["fast"] <= finals["seeds"] * 1.01, finals
