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
    return initial_rows(fids, dim, [(kind, scale)], torch.zeros(len(fids), dtype=torch.int64, device=fids.device),
                        seed)


#: Fids per block of ``initial_rows`` on a CPU: its int64 / float64 temporaries ([block, dim], a
#: dozen of them) stay in cache; one pass over a whole 500k-fid batch was 3.6x slower. (A GPU
#: takes a batch in one pass.)
BLOCK = 16_384


def initial_rows(fids: torch.Tensor, dim: int, initializers: list[tuple[InitializerKind, float]],
                 choice: torch.Tensor, seed: int) -> torch.Tensor:
    """[n, dim] float32 initial rows, fid ``i`` by ``initializers[choice[i]]`` (kind, scale) as in
    ``initial_values``: one pass per block of fids whatever their initializers."""
    if len(fids) <= BLOCK or fids.device.type != "cpu":
        return _initial_block(fids, dim, initializers, choice, seed)
    return torch.cat([_initial_block(fids[at:at + BLOCK], dim, initializers, choice[at:at + BLOCK], seed)
                      for at in range(0, len(fids), BLOCK)])


def _initial_block(fids: torch.Tensor, dim: int, initializers: list[tuple[InitializerKind, float]],
                   choice: torch.Tensor, seed: int) -> torch.Tensor:
    if len(fids) == 0:
        return torch.zeros(0, dim, device=fids.device)
    kinds = [kind for kind, _ in initializers]
    if all(kind is InitializerKind.ZEROS for kind in kinds):
        return torch.zeros(len(fids), dim, device=fids.device)
    scale = torch.tensor([0.0 if kind is InitializerKind.ZEROS else scale for kind, scale in initializers],
                         dtype=torch.float64, device=fids.device).index_select(0, choice)
    h = fid_hashes(fids, dim, seed)
    u = _uniform(h)
    values = u * 2 - 1  # (uniform; zeros: scale 0)
    normal = [code for code, kind in enumerate(kinds)
              if kind in (InitializerKind.NORMAL, InitializerKind.TRUNCATED_NORMAL)]
    if normal:
        at = torch.nonzero(torch.isin(choice, torch.tensor(normal, device=fids.device))).squeeze(1)
        drawn = torch.sqrt(-2.0 * torch.log1p(-u.index_select(0, at))) * torch.cos(
            2 * math.pi * _uniform(mix64(h.index_select(0, at))))
        truncated = [code for code, kind in enumerate(kinds) if kind is InitializerKind.TRUNCATED_NORMAL]
        if truncated:
            clip = torch.isin(choice.index_select(0, at), torch.tensor(truncated, device=fids.device))
            drawn = torch.where(clip.unsqueeze(1), drawn.clamp(-2.0, 2.0), drawn)
        values[at] = drawn
    # + 0.0: a ZEROS row is (-u) * 0 = -0.0 for half its entries; IEEE -0.0 + 0.0 is +0.0
    return (values * scale.unsqueeze(1) + 0.0).to(torch.float32)
