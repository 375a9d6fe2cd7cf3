"""One small GPU for serving and training: a per-host Redis lease that makes that host's chat workers release it."""

from __future__ import annotations

import json
import logging
import math
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from personabot.core import keys
from personabot.core.events import GpuReclaim, GpuRelease, publish

log = logging.getLogger(__name__)
# Below this much GPU memory the served 7B model and a training run do not fit side by side.
SHARE_LIMIT_GB = 40.0
# The trainer refreshes its lease every third of this; a SIGKILLed trainer's lease lapses this fast.
LEASE_TTL_S = 30.0
# A chat worker's "loaded"/"released" entry counts for this long unless the worker refreshes it.
HOLDER_TTL_S = 15.0


def gpu_host(configured: str | None = None) -> str:
    """The name that scopes the GPU lease: `configured`, else PERSONABOT_GPU_HOST, else the hostname."""
    if configured is None:
        from personabot.core.settings import get_settings

        configured = get_settings().gpu_host
    return configured or socket.gethostname()


def lease_key(host: str) -> str:
    return keys.GPU_LEASE + host


def holders_key(host: str) -> str:
    return keys.GPU_HOLDERS + host


def read_lease(client: redis.Redis, host: str) -> dict[str, Any] | None:
    """The live release lease of `host` ({run_id, eta_s, since}) or None."""
    raw = client.get(lease_key(host))
    if raw is None:
        return None
    try:
        return dict(json.loads(raw))
    except (ValueError, TypeError):
        return {}


def mark_holder(client: redis.Redis, host: str, worker: str, state: str, ttl_s: float = HOLDER_TTL_S) -> None:
    """A chat worker says whether it holds the GPU ("loaded") or not ("released"), for `ttl_s`."""
    client.hset(holders_key(host), worker, json.dumps({"state": state, "until": time.time() + ttl_s}))


def drop_holder(client: redis.Redis, host: str, worker: str) -> None:
    client.hdel(holders_key(host), worker)


def loaded_holders(client: redis.Redis, host: str) -> list[str]:
    """Chat workers on `host` that still hold the model (entries that lapsed are removed)."""
    now, loaded, lapsed = time.time(), [], []
    for worker, raw in client.hgetall(holders_key(host)).items():
        try:
            entry = json.loads(raw)
            state, until = str(entry["state"]), float(entry["until"])
        except (ValueError, TypeError, KeyError):
            state, until = "", 0.0
        if until < now:
            lapsed.append(worker)
        elif state == "loaded":
            loaded.append(worker.decode() if isinstance(worker, bytes) else str(worker))
    if lapsed:
        client.hdel(holders_key(host), *lapsed)
    return sorted(loaded)


def gpu_memory_gb() -> float | None:
    """Total memory of the first GPU from nvidia-smi (no CUDA context in this process), or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return float(out.split()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def should_release(mode: str, memory_gb: float | None = None) -> bool:
    """release: always; concurrent: never; auto: when a GPU is there and has < 40 GB."""
    if mode == "release":
        return True
    if mode == "concurrent":
        return False
    memory_gb = gpu_memory_gb() if memory_gb is None else memory_gb
    return memory_gb is not None and memory_gb < SHARE_LIMIT_GB


def _wait_for_acks(client: redis.Redis, host: str, wait_s: float) -> list[str]:
    """Wait up to `wait_s` until no chat worker on `host` holds the model; returns those that still do."""
    deadline = time.monotonic() + wait_s
    while True:
        loaded = loaded_holders(client, host)
        if not loaded or time.monotonic() >= deadline:
            return loaded
        time.sleep(0.2)


@contextmanager
def gpu_released(redis_client: redis.Redis | None, *, release: bool, eta_s: float | None, wait_s: float,
                 run_id: int | None = None, host: str | None = None,
                 lease_ttl_s: float = LEASE_TTL_S) -> Iterator[None]:
    """Hold the release lease of `host` (refreshed while the block runs), publish `gpu.release`, wait up
    to `wait_s` for that host's chat workers to acknowledge, and always drop the lease and publish
    `gpu.reclaim` at the end. A trainer that dies without the finally block lets the lease lapse, and the
    chat workers reclaim by themselves."""
    if not release or redis_client is None:
        yield
        return
    host = gpu_host(host)
    key = lease_key(host)
    ttl_ms = max(1000, math.ceil(lease_ttl_s * 1000))
    value = json.dumps({"run_id": run_id, "eta_s": eta_s, "since": time.time()})
    redis_client.set(key, value, px=ttl_ms)
    publish(redis_client, GpuRelease(host=host, eta_s=eta_s, run_id=run_id))
    log.info("asked chat workers on %s to release the GPU for run %s (eta %s s)", host, run_id, eta_s)
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(lease_ttl_s / 3):
            try:
                redis_client.set(key, value, px=ttl_ms)
            except redis.RedisError as error:
                log.warning("cannot refresh the GPU lease of %s (%s); retrying", host, error)

    refresher = threading.Thread(target=refresh, name="gpu-lease", daemon=True)
    refresher.start()
    try:
        still_loaded = _wait_for_acks(redis_client, host, wait_s)
        if still_loaded:
            log.warning("chat workers %s did not release the GPU within %.0f s; training anyway "
                        "(raise PERSONABOT_GPU_RELEASE_WAIT_S if it runs out of memory)",
                        ", ".join(still_loaded), wait_s)
        yield
    finally:
        stop.set()
        refresher.join(timeout=5)
        try:
            redis_client.delete(key)
            publish(redis_client, GpuReclaim(host=host, run_id=run_id))
            log.info("told chat workers on %s to reclaim the GPU after run %s", host, run_id)
        except redis.RedisError as error:
            log.warning("cannot announce the GPU reclaim (%s); chat workers reclaim when the lease lapses", error)
