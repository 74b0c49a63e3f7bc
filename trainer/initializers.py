"""Initial embedding values as a function of (fid, seed) alone - counter-based, not a random stream.

For column ``j`` of fid ``f``: ``h = mix64(mix64(f, seed) + j * GAMMA)`` and ``h' = mix64(h)``
(splitmix64 steps, ``trainer.hashing``); ``u = top 53 bits of h / 2**53`` is uniform on [0, 1),
and the normal value is Box-Muller's ``sqrt(-2 ln(1 - u)) * cos(2 pi u')``. So a fid starts with
the same row whichever table, shard, cache or device inserts it, in whatever order: a table
sharded over workers, a cache that evicts and fetches, and a restored snapshot all initialise
exactly as one big table would (and CPU and CUDA agree to float rounding).
"""
from __future__ import annotations

import math

import torch

from schemas.hashing import GAMMA
from schemas.spec_types import InitializerKind
from trainer.hashing import _shr, mix64

_GAMMA = GAMMA - (1 << 64)  # as int64
_MANTISSA = (1 << 53) - 1


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """[0, 1) float64 from the top 53 bits of int64 hashes."""
    return _shr(bits, 11).to(torch.float64) * (1.0 / (1 << 53))


def fid_hashes(fids: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """[n, dim] int64: one splitmix64 value per (fid, column)."""
    columns = torch.arange(dim, dtype=torch.int64, device=fids.device) * _GAMMA
    return mix64(mix64(fids, seed).unsqueeze(1) + columns)


def initial_values(fids: torch.Tensor, dim: int, kind: InitializerKind, scale: float, seed: int) -> torch.Tensor:
    """[n, dim] float32 initial rows: zeros, ``scale`` x U(-1, 1), ``scale`` x N(0, 1) or
    ``scale`` x N(0, 1) truncated to [-2, 2]."""
    if kind is InitializerKind.ZEROS or len(fids) == 0:
        return torch.zeros(len(fids), dim, device=fids.device)
    h = fid_hashes(fids, dim, seed)
    u = _uniform(h)
    if kind is InitializerKind.UNIFORM:
        values = u * 2 - 1
    else:
        values = torch.sqrt(-2.0 * torch.log1p(-u)) * torch.cos(2 * math.pi * _uniform(mix64(h)))
        if kind is InitializerKind.TRUNCATED_NORMAL:
            values = values.clamp_(-2.0, 2.0)
    return (values * scale).to(torch.float32)
