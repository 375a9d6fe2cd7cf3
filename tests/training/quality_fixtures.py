"""Session fixture: the real small instruct model (SmolLM2-135M-Instruct, Qwen2 layout), converted once per cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_model() -> Path:
    """The model `personabot make-small-model --cache` wrote (scripts/test.sh runs it before pytest).

    Nothing is downloaded at test time: a missing cache fails the test, naming the command.
    """
    from personabot.training.small_model import CACHE_ENV, cache_root, find_cached_small_model

    found = find_cached_small_model(cache_root())
    if found is None:
        pytest.fail(f"no converted small model in {cache_root()}: run `personabot make-small-model --cache` "
                    f"first (scripts/test.sh does; {CACHE_ENV} picks another cache directory)", pytrace=False)
    return found
