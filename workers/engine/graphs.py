"""CUDA graphs of decode steps: one per (rows bucket, LoRA mode), all captured at start-up, replayed in place."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from personabot.workers.engine.layout import LoraMode

Step = Callable[[int, LoraMode], torch.Tensor]


class GraphMissingError(RuntimeError):
    """A decode step asked for a graph that start-up did not prepare (nothing is captured while serving)."""


class DecodeGraphs:
    """`prepare` captures `step(rows, mode)` for every bucket the worker can run; `run` replays one.

    The lengths are no part of the key: the step reads each row's length from device memory. Every
    graph shares one memory pool, and the step writes its logits into one static buffer shared by all
    graphs, so the graphs cost one step's working memory, not one per graph.
    """

    def __init__(self, step: Step) -> None:
        self._step = step
        self._graphs: dict[tuple[int, LoraMode], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = torch.cuda.graph_pool_handle()
        self.captures = 0
        self.capture_s = 0.0

    def prepare(self, rows: Iterable[int], modes: Iterable[LoraMode]) -> None:
        """Capture every (rows, mode) graph not captured yet; counts them and the time they took."""
        started = time.perf_counter()
        modes = list(modes)
        for count in rows:
            for mode in modes:
                if (count, mode) not in self._graphs:
                    self._capture(count, mode)
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - started

    def run(self, rows: int, mode: LoraMode) -> torch.Tensor:
        """Replay the bucket's graph; returns the static logits it writes."""
        entry = self._graphs.get((rows, mode))
        if entry is None:
            raise GraphMissingError(f"no decode graph for {rows} rows in LoRA mode {mode!r}: start-up prepares "
                                    "one per rows bucket up to max_batch and per LoRA mode")
        graph, logits = entry
        graph.replay()
        return logits

    def _capture(self, rows: int, mode: LoraMode) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(rows, mode)  # warm-up: compiles kernels and sets up cuBLAS outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._step(rows, mode)
        self._graphs[(rows, mode)] = (graph, logits)
        self.captures += 1
