"""Sharing one small GPU: when training asks the chat workers to release it, and that it always reclaims."""

from __future__ import annotations

import pytest

from core import events
from training.gpu_share import gpu_released, should_release


def test_release_policy() -> None:
    assert should_release("release", memory_gb=141)
    assert not should_release("concurrent", memory_gb=24)
    assert should_release("auto", memory_gb=24)
    assert not should_release("auto", memory_gb=80)


def test_release_then_reclaim_even_when_the_run_fails(redis_client) -> None:
    with pytest.raises(RuntimeError, match="ms-swift crashed"), \
            gpu_released(redis_client, release=True, eta_s=300, wait_s=0, run_id=7):
        assert [e.type for e in events.recent(redis_client)] == ["gpu.release"]
        raise RuntimeError("ms-swift crashed")
    published = list(reversed(events.recent(redis_client)))
    assert [(e.type, e.data) for e in published] == [("gpu.release", {"eta_s": 300, "run_id": 7}),
                                                     ("gpu.reclaim", {"run_id": 7})]


def test_nothing_is_published_when_both_fit(redis_client) -> None:
    with gpu_released(redis_client, release=False, eta_s=300, wait_s=0):
        pass
    assert events.recent(redis_client) == []
