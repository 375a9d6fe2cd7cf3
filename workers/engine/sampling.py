"""Batched next-token choice with per-row temperature, top-p, repetition penalty and seeds."""

from __future__ import annotations

import torch


class RowSampler:
    """Per-row sampling state on the device: parameters and the tokens each row has seen."""

    def __init__(self, rows: int, vocab: int, device: torch.device) -> None:
        self.device = device
        self.temperature = torch.zeros(rows, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.host_temperature = [0.0] * rows
        self.host_top_p = [1.0] * rows
        self.host_penalty = [1.0] * rows
        self.generators: dict[int, torch.Generator] = {}

    def configure(self, row: int, prompt_ids: list[int], *, temperature: float, top_p: float,
                  penalty: float, seed: int | None) -> None:
        self.temperature[row] = temperature
        self.top_p[row] = top_p
        self.penalty[row] = penalty
        self.host_temperature[row], self.host_top_p[row], self.host_penalty[row] = temperature, top_p, penalty
        self.seen[row] = False
        if penalty != 1.0:
            self.seen[row, torch.tensor(prompt_ids, device=self.device)] = True
        self.generators.pop(row, None)
        if seed is not None and temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self.generators[row] = generator

    def clear(self, row: int) -> None:
        self.host_temperature[row], self.host_top_p[row], self.host_penalty[row] = 0.0, 1.0, 1.0
        self.generators.pop(row, None)

    def uses_penalty(self, active: list[int]) -> bool:
        return any(self.host_penalty[r] != 1.0 for r in active)

    def sample(self, logits: torch.Tensor, active: list[int], start: int = 0) -> torch.Tensor:
        """Choose a token for each logits row i (sampler row start + i); only `active` rows matter."""
        rows = slice(start, start + logits.shape[0])
        if self.uses_penalty(active):
            penalty = self.penalty[rows, None]
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self.seen[rows], penalised, logits)
        greedy = logits.argmax(dim=-1)
        if all(self.host_temperature[r] == 0 for r in active):
            return greedy
        temperature = self.temperature[rows, None]
        probs = torch.softmax(logits / temperature.clamp_min(1e-5), dim=-1)
        if any(self.host_top_p[r] < 1.0 for r in active):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.top_p[rows, None]
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        sampled = torch.multinomial(probs, 1)[:, 0]
        for row, generator in self.generators.items():
            if rows.start <= row < rows.stop:
                sampled[row - start] = torch.multinomial(probs[row - start], 1, generator=generator)[0]
        return torch.where(temperature[:, 0] == 0, greedy, sampled)

    def observe(self, tokens: torch.Tensor, start: int = 0) -> None:
        """Remember each row's new token for the repetition penalty."""
        index = torch.arange(start, start + tokens.shape[0], device=self.device)
        self.seen[index, tokens] = True
