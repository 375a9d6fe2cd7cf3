"""When a batch of one adapter runs on merged weights: after it has run alone for a few decode steps."""

from __future__ import annotations

import time

import torch

from personabot.workers.engine.layout import MERGED, LoraMode
from personabot.workers.engine.qwen2 import Qwen2Decoder

MERGE_AFTER_STEPS = 8  # decode steps of one adapter alone before its weights are merged (about 10 ms on a GPU)


class MergePolicy:
    """Counts how long one slot has run alone and merges it into the weight copies once that is long enough."""

    def __init__(self, after_steps: int = MERGE_AFTER_STEPS) -> None:
        self.after_steps = after_steps
        self._candidate: int | None = None
        self._streak = 0

    def mode(self, decoder: Qwen2Decoder, slot: int, counters: dict[str, int | float]) -> LoraMode:
        """MERGED once `slot` has run alone for `after_steps` steps (merging it then), else `slot`.

        A batch of one adapter then costs what the base model costs. Requests that started on an
        older adapter keep the batch mixed until they end, so a swap merges only after they do.
        """
        if decoder.merged_slot == slot:
            return MERGED
        if self._candidate == slot:
            self._streak += 1
        else:
            self._candidate, self._streak = slot, 1
        if self._streak < self.after_steps:
            return slot
        started = time.perf_counter()
        decoder.merge(slot)
        if decoder.device.type == "cuda":
            torch.cuda.synchronize()
        took = (time.perf_counter() - started) * 1000
        counters["merges"] += 1
        counters["merge_ms_max"] = max(counters["merge_ms_max"], round(took, 2))
        return MERGED
