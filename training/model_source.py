"""Where the base model comes from: one local directory for training, evaluation and the chat workers."""

from __future__ import annotations

import os
from pathlib import Path

from personabot.core.settings import Settings


class ModelUnavailableError(RuntimeError):
    """The base model is neither a local directory nor obtainable from the configured hub."""


def hub_is_hf(settings: Settings) -> bool:
    """True when models come from Hugging Face: `settings.use_hf` or ms-swift's own USE_HF=1/true."""
    return settings.use_hf or os.environ.get("USE_HF", "").strip().lower() in ("1", "true", "yes", "on")


def hub_env(settings: Settings) -> dict[str, str]:
    """Environment entries that make ms-swift (and its children) use the same hub as we do."""
    return {"USE_HF": "1" if hub_is_hf(settings) else "0"}


def resolve_model_dir(settings: Settings) -> Path:
    """The base model as a local directory, downloading it once into the hub cache when needed.

    `settings.model` is used as is when it is a directory. Otherwise it is a hub id fetched from
    Hugging Face when `settings.use_hf` (or USE_HF=1) is set, else from ModelScope, exactly as
    ms-swift does for training, so every process loads the same files. Raises ModelUnavailableError
    with the fix when the download fails (offline host, unknown id).
    """
    local = Path(settings.model).expanduser()
    if local.is_dir():
        return local.resolve()
    hub = "Hugging Face" if hub_is_hf(settings) else "ModelScope"
    try:
        if hub_is_hf(settings):
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(settings.model)).resolve()
        from modelscope import snapshot_download as ms_snapshot_download

        return Path(ms_snapshot_download(settings.model)).resolve()
    except Exception as error:
        raise ModelUnavailableError(
            f"cannot get the model {settings.model!r} from {hub} ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else 'no detail'}); "
            "set PERSONABOT_MODEL to a local model directory, or PERSONABOT_USE_HF to pick the other hub"
        ) from None


__all__ = ["ModelUnavailableError", "hub_env", "hub_is_hf", "resolve_model_dir"]
