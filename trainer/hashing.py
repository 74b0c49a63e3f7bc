"""Vectorised 64-bit hashing in torch (the same bits on CPU and CUDA): ``schemas.hashing``'s twin.

``mix64`` is splitmix64 (golden-gamma step and finaliser) on int64 tensors; multiplication wraps modulo 2**64 and
right shifts are made logical by masking, so results equal the unsigned reference.

>>> import torch
>>> mix64(torch.tensor([0, 1, 2])).tolist()
[-2152535657050944081, -7995527694508729151, -7541218347953203506]
"""
from __future__ import annotations

import torch

from schemas.hashing import GAMMA, M1, M2

_GAMMA, _M1, _M2 = (constant - (1 << 64) for constant in (GAMMA, M1, M2))  # as int64


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (arithmetic shift, then clear the sign-extended bits)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """splitmix64 of ``x ^ seed``: ``z = x + gamma``, then the finaliser; a bijection on 64-bit values."""
    z = (x ^ seed if seed else x) + _GAMMA
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def fast_range(h32: torch.Tensor, n: int) -> torch.Tensor:
    """Map 32-bit values uniformly onto [0, n) without a division: ``(h * n) >> 32``."""
    return (h32 * n) >> 32


OWNER_SEED = 0x0A11CE  # fid -> trainer worker (``trainer.sharded``), independent of the index's hashes


def owner_of(fids: torch.Tensor, workers: int) -> torch.Tensor:
    """The trainer worker of ``workers`` that holds each fid's row: ``(mix64(fid, OWNER_SEED) >>> 1) mod workers``."""
    return ((mix64(fids, OWNER_SEED) >> 1) & ((1 << 62) - 1)) % workers
