"""Sharing one small GPU: the per-host release lease, acknowledgements, and that it always ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from personabot.core import events
from personabot.core.gpu_share import (
    gpu_released,
    lease_key,
    loaded_holders,
    mark_holder,
    read_lease,
    should_release,
)

REPO = Path(__file__).resolve().parents[2]


def test_release_policy() -> None:
    assert should_release("release", memory_gb=141)
    assert not should_release("concurrent", memory_gb=24)
    assert should_release("auto", memory_gb=24)
    assert not should_release("auto", memory_gb=80)


def test_release_then_reclaim_even_when_the_run_fails(redis_client) -> None:
    with pytest.raises(RuntimeError, match="ms-swift crashed"), \
            gpu_released(redis_client, release=True, eta_s=300, wait_s=0, run_id=7, host="box-a"):
        assert [e.type for e in events.recent(redis_client)] == ["gpu.release"]
        assert read_lease(redis_client, "box-a")["run_id"] == 7
        assert read_lease(redis_client, "box-b") is None
        raise RuntimeError("ms-swift crashed")
    published = list(reversed(events.recent(redis_client)))
    assert [(e.type, e.data) for e in published] == [
        ("gpu.release", {"eta_s": 300, "run_id": 7, "host": "box-a"}),
        ("gpu.reclaim", {"run_id": 7, "host": "box-a"})]
    assert read_lease(redis_client, "box-a") is None


def test_nothing_is_published_when_both_fit(redis_client) -> None:
    with gpu_released(redis_client, release=False, eta_s=300, wait_s=0, host="box-a"):
        pass
    assert events.recent(redis_client) == []
    assert read_lease(redis_client, "box-a") is None


def test_training_waits_for_the_workers_of_its_host_only(redis_client) -> None:
    mark_holder(redis_client, "box-a", "chat1@box-a", "loaded")
    mark_holder(redis_client, "box-b", "chat1@box-b", "loaded")  # another host: not waited for
    mark_holder(redis_client, "box-a", "dead@box-a", "loaded", ttl_s=0.01)  # lapsed: not waited for
    time.sleep(0.05)
    acked = threading.Event()

    def worker_releases() -> None:
        while read_lease(redis_client, "box-a") is None:
            time.sleep(0.05)
        time.sleep(0.5)
        mark_holder(redis_client, "box-a", "chat1@box-a", "released")
        acked.set()

    helper = threading.Thread(target=worker_releases)
    helper.start()
    with gpu_released(redis_client, release=True, eta_s=60, wait_s=60, host="box-a"):
        assert acked.is_set()
        assert loaded_holders(redis_client, "box-a") == []
    helper.join()
    assert loaded_holders(redis_client, "box-b") == ["chat1@box-b"]


def test_a_killed_trainer_lease_lapses(redis_server, redis_client) -> None:
    script = textwrap.dedent(f"""
        import sys, time, redis
        from personabot.core.gpu_share import gpu_released
        client = redis.Redis.from_url({redis_server.url!r})
        with gpu_released(client, release=True, eta_s=60, wait_s=0, host="box-a", lease_ttl_s=1.5):
            print("training", flush=True)
            time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE)
    try:
        assert trainer.stdout is not None and trainer.stdout.readline().strip() == b"training"
        time.sleep(3)  # twice the TTL: the living trainer keeps its lease
        assert read_lease(redis_client, "box-a") is not None
        os.kill(trainer.pid, signal.SIGKILL)  # no finally block, no gpu.reclaim event
        trainer.wait(timeout=10)
        deadline = time.monotonic() + 10
        while read_lease(redis_client, "box-a") is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not redis_client.exists(lease_key("box-a"))
        assert "gpu.reclaim" not in [e.type for e in events.recent(redis_client)]
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
