"""Stopping child processes that run in their own process group (ms-swift, evaluation, `up`'s services)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence

KILL_GRACE_S = 4.0  # SIGTERM first; what still runs after this long gets SIGKILL
REAP_S = 5.0  # how long to wait for a SIGKILLed process to be gone


def signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the process group `process` leads (nothing if the group is gone)."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process_groups(processes: Sequence[subprocess.Popen[bytes]], grace_s: float = KILL_GRACE_S, *,
                        on_kill: Callable[[int], None] | None = None) -> None:
    """SIGTERM every group, wait up to `grace_s` for them all, then SIGKILL what is left of each group
    (grandchildren such as pool workers too). `on_kill(i)` is told when processes[i] outlived the grace."""
    for process in processes:
        signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for index, process in enumerate(processes):
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if on_kill is not None:
                on_kill(index)
        signal_group(process, signal.SIGKILL)
        try:
            process.wait(REAP_S)
        except subprocess.TimeoutExpired:
            pass


def stop_process(process: subprocess.Popen[bytes], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the whole process group, SIGKILL it after `grace_s`."""
    stop_process_groups([process], grace_s)
