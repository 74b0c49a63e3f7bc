"""CowClip (Zheng et al., AAAI 2023): adaptive column-wise clipping of embedding gradients.

For each id ``j`` of a batch, with ``cnt_j`` its occurrences in the batch and ``w_j`` its
embedding: ``clip_j = cnt_j * max(ratio * ||w_j||, min_clip)`` and
``g_j <- g_j * min(1, clip_j / ||g_j||)``. Only deep embeddings are clipped (not wide, dim-1
ones, not dense weights). Paper defaults for Criteo: ratio 1, min_clip 1e-5.

The scaling rule for growing the batch from ``base`` to ``s * base``: embedding lr unchanged,
embedding L2 x s, dense lr x sqrt(s), with a linear warm-up of the dense lr.

>>> new = scale_hyperparameters(Hyperparameters(1024, 1e-4, 1e-5, 1e-3, 0), 8192)
>>> new.embedding_lr, new.embedding_l2, round(new.dense_lr, 6), new.warmup_steps
(0.0001, 8e-05, 0.002828, 3)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def cowclip(grads: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor, ratio: float = 1.0,
            min_clip: float = 1e-5) -> torch.Tensor:
    """Clipped gradients of unique ids: ``grads`` [n, d] (summed per id), ``weights`` [n, d], ``counts`` [n]."""
    clip = counts.to(grads.dtype) * torch.clamp(ratio * weights.norm(dim=1), min=min_clip)
    norm = grads.norm(dim=1)
    scale = torch.where(norm > 0, torch.clamp(clip / norm.clamp(min=1e-30), max=1.0), torch.ones_like(norm))
    return grads * scale.unsqueeze(1)


@dataclass(frozen=True)
class Hyperparameters:
    batch_size: int
    embedding_lr: float
    embedding_l2: float
    dense_lr: float
    warmup_steps: int


def scale_hyperparameters(base: Hyperparameters, batch_size: int, warmup_steps: int | None = None) -> Hyperparameters:
    """CowClip's rule for ``batch_size = s * base.batch_size``: embedding lr kept, L2 x s, dense lr x sqrt(s).

    Warm-up: unless given, the base warm-up shrinks with the step count (``base / s`` steps) but
    lasts at least one step per doubling of the batch (``log2 s``).
    """
    s = batch_size / base.batch_size
    if s <= 0:
        raise ValueError(f"batch size must be > 0, got {batch_size}")
    warmup = warmup_steps if warmup_steps is not None else max(
        int(math.ceil(base.warmup_steps / s)), int(math.log2(s)) if s > 1 else 0)
    return Hyperparameters(batch_size, base.embedding_lr, base.embedding_l2 * s, base.dense_lr * math.sqrt(s), warmup)
