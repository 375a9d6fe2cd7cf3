"""Bench only: a training-step hook for training/swift_fast.py that times and profiles ms-swift's steps."""

from __future__ import annotations

import json
from typing import Any


class StepTrace:
    """Plugin config {"step_hook": "bench.step_trace:StepTrace", "trace": path}: wall time inside vs
    between training_step calls (no added synchronisation: inside = issuing forward and backward), and
    one whole step profiled; written to `path` as JSON after DUMP_AT steps."""

    PROFILE_AT, DUMP_AT = 30, 45

    def __init__(self, path: str) -> None:
        self.path = path
        self.inside: list[float] = []
        self.outside: list[float] = []
        self.last_exit: float | None = None
        self.profiler: Any = None

    def enter(self) -> float:
        import time

        now = time.perf_counter()
        if self.last_exit is not None:
            self.outside.append(now - self.last_exit)
        calls = len(self.inside)
        if calls == self.PROFILE_AT:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.profiler.__enter__()
        elif calls == self.PROFILE_AT + 1 and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
        return now

    def exit(self, started: float, tokens: int, kept: int) -> None:
        import statistics
        import time

        self.last_exit = time.perf_counter()
        self.inside.append(self.last_exit - started)
        if len(self.inside) != self.DUMP_AT:
            return
        report: dict[str, Any] = {
            "inside_ms_median": round(1000 * statistics.median(self.inside[5:]), 1),
            "outside_ms_median": round(1000 * statistics.median(self.outside[5:]), 1),
            "last": {"tokens": tokens, "kept_layers": kept},
        }
        if self.profiler is not None:
            events = self.profiler.key_averages()
            report["top_cpu"] = [(e.key[:70], e.count, round(e.self_cpu_time_total / 1000, 2))
                                 for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]]
            report["top_gpu"] = [(e.key[:70], e.count, round(e.self_device_time_total / 1000, 2))
                                 for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]]
        with open(self.path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
