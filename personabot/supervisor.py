"""Run child processes under supervision: one prefixed log, restart with backoff, clean stop."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from personabot.core.processes import stop_process_groups

log = logging.getLogger(__name__)


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    reader: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    """Start every child, restart the ones that die (exponential backoff), stop all on request.

    Every line a child prints goes to `out` as "[name] line", with secret values masked.
    """

    def __init__(self, specs: Sequence[ChildSpec], *, out: TextIO | None = None,
                 secrets: Sequence[str] = (), max_backoff: float = 30.0) -> None:
        self.children = [_Child(spec) for spec in specs]
        self.out = out or sys.stdout
        self.secrets = [s for s in secrets if s]
        self.max_backoff = max_backoff
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.width = max((len(s.name) for s in specs), default=4)

    def emit(self, name: str, line: str) -> None:
        for secret in self.secrets:
            line = line.replace(secret, "***")
        with self._lock:
            self.out.write(f"[{name:<{self.width}}] {line.rstrip()}\n")
            self.out.flush()

    def _pump(self, child: _Child) -> None:
        process = child.process
        assert process is not None and process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            self.emit(child.spec.name, raw.decode("utf-8", errors="replace"))

    def _start(self, child: _Child) -> None:
        spec = child.spec
        child.process = subprocess.Popen(
            spec.argv, env=spec.env, cwd=spec.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        child.started_at = time.monotonic()
        child.reader = threading.Thread(target=self._pump, args=(child,), daemon=True)
        child.reader.start()
        self.emit("up", f"started {spec.name} (pid {child.process.pid})")

    def start(self) -> None:
        for child in self.children:
            self._start(child)

    def poll(self) -> None:
        """Restart dead children whose backoff has passed; call this regularly."""
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is not None:
                code = process.returncode
                if now - child.started_at > 60:
                    child.restarts = 0  # it ran fine for a while: start backoff over
                delay = min(self.max_backoff, 2.0 ** child.restarts)
                child.restarts += 1
                child.next_start = now + delay
                child.process = None
                self.emit("up", f"{child.spec.name} exited with code {code}; restarting in {delay:.0f}s "
                                f"(restart #{child.restarts})")
            elif process is None and now >= child.next_start and not self._stop.is_set():
                self._start(child)

    def run_forever(self, interval: float = 0.5) -> None:
        self.start()
        while not self._stop.wait(interval):
            self.poll()

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every child: SIGTERM to its process group, SIGKILL after `timeout`."""
        self._stop.set()
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in running:
            self.emit("up", f"stopping {child.spec.name}")

        def killing(index: int) -> None:
            self.emit("up", f"{running[index].spec.name} did not stop in {timeout:.0f}s; killing it")

        stop_process_groups([c.process for c in running if c.process is not None], timeout, on_kill=killing)
        for child in self.children:
            if child.reader is not None:
                child.reader.join(timeout=2)

    def pids(self) -> list[int]:
        return [c.process.pid for c in self.children if c.process is not None and c.process.poll() is None]
