"""Frequency filter: a fid gets a table row only after it was seen ``min_count`` times.

Counting happens in bounded memory, a count-min sketch of ``depth`` rows x ``width`` int32
counters with conservative update (a counter only grows to the new minimum estimate). Counters
do not saturate below 2**31 - 1 (Monolith's counting filter stops at 15).

Error: an estimate never undercounts, so a fid is never admitted late; it may be admitted early
(a *false admit*) when all its ``depth`` counters also carry other fids' counts. With ``N``
increments spread over ``width`` counters (load ``lam = N / width``), a fid still ``k`` short of
``min_count`` is admitted with probability at most ``P(Poisson(lam) >= k) ** depth`` (each row's
collision mass is close to Poisson; conservative update only lowers it). ``false_admit_bound``
computes it; a test checks the measured rate against it.
"""
from __future__ import annotations

import math

import torch

from trainer.hashing import fast_range, mix64

_INT32_MAX = (1 << 31) - 1


def false_admit_bound(increments: int, width: int, depth: int, short_by: int = 1) -> float:
    """Upper bound on P(admit) for a fid ``short_by`` occurrences below its threshold."""
    lam = increments / width
    below = sum(math.exp(-lam) * lam**i / math.factorial(i) for i in range(short_by))
    return (1.0 - below) ** depth


class CountMinSketch:
    def __init__(self, width: int = 1 << 20, depth: int = 4, seed: int = 0, device: str | torch.device = "cpu"):
        if width < 1 or depth < 1:
            raise ValueError(f"count-min sketch needs width >= 1 and depth >= 1, got {width} x {depth}")
        self.width, self.depth = width, depth
        self.seeds = [mix64(torch.tensor(seed * 1009 + i)).item() for i in range(depth)]
        self.counters = torch.zeros(depth, width, dtype=torch.int32, device=device)
        self.increments = 0

    def _cells(self, fids: torch.Tensor) -> torch.Tensor:
        """[depth, n] counter index per row."""
        return torch.stack([fast_range(mix64(fids, s) & 0xFFFFFFFF, self.width) for s in self.seeds])

    def estimate(self, fids: torch.Tensor) -> torch.Tensor:
        cells = self._cells(fids)
        return torch.gather(self.counters, 1, cells).min(dim=0).values

    def add(self, fids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Add ``counts`` occurrences of each (unique) fid; returns the new estimates."""
        cells = self._cells(fids)
        current = torch.gather(self.counters, 1, cells)
        target = (current.min(dim=0).values.long() + counts.long()).clamp_(max=_INT32_MAX).to(torch.int32)
        self.counters.scatter_reduce_(1, cells, target.expand(self.depth, -1), reduce="amax")
        self.increments += int(counts.sum())
        return torch.gather(self.counters, 1, cells).min(dim=0).values

    def memory_bytes(self) -> int:
        return self.counters.numel() * self.counters.element_size()

    def state_dict(self) -> dict:
        return {"counters": self.counters.cpu(), "increments": self.increments, "seeds": self.seeds}

    def load_state_dict(self, state: dict) -> None:
        self.counters = state["counters"].to(self.counters.device)
        self.increments = int(state["increments"])
        self.seeds = list(state["seeds"])
        self.depth, self.width = self.counters.shape
