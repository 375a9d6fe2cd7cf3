"""CUDA graphs of decode steps: one captured graph per (rows, length, LoRA mode) bucket, replayed in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from personabot.workers.engine.layout import LoraMode

Step = Callable[[int, int, LoraMode], torch.Tensor]


class DecodeGraphs:
    """Captures `step(rows, length, mode)` on first use of a bucket; later calls replay that graph."""

    def __init__(self, step: Step) -> None:
        self._step = step
        self._graphs: dict[tuple[int, int, LoraMode], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = torch.cuda.graph_pool_handle()
        self.captures = 0

    def run(self, rows: int, length: int, mode: LoraMode) -> torch.Tensor:
        """Replay the bucket's graph (capturing it first); returns its static logits tensor."""
        entry = self._graphs.get((rows, length, mode))
        if entry is None:
            entry = self._capture(rows, length, mode)
        graph, logits = entry
        graph.replay()
        return logits

    def _capture(self, rows: int, length: int, mode: LoraMode) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(rows, length, mode)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._step(rows, length, mode)
        self._graphs[(rows, length, mode)] = (graph, logits)
        self.captures += 1
        return graph, logits
