"""One small GPU for serving and training: ask the chat workers to release it while a run trains."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from core.events import publish

log = logging.getLogger(__name__)
# Below this much GPU memory the served 7B model and a training run do not fit side by side.
SHARE_LIMIT_GB = 40.0


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


@contextmanager
def gpu_released(redis_client: Any, *, release: bool, eta_s: float | None, wait_s: float,
                 run_id: int | None = None) -> Iterator[None]:
    """Publish `gpu.release` (then wait `wait_s` for the chat workers to free memory) and always
    `gpu.reclaim` at the end, whether the run succeeded, failed or was cancelled."""
    if not release or redis_client is None:
        yield
        return
    publish(redis_client, "gpu.release", eta_s=eta_s, run_id=run_id)
    log.info("asked chat workers to release the GPU for run %s (eta %s s)", run_id, eta_s)
    try:
        time.sleep(wait_s)
        yield
    finally:
        publish(redis_client, "gpu.reclaim", run_id=run_id)
        log.info("told chat workers to reclaim the GPU after run %s", run_id)
