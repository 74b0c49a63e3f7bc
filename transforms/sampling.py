"""Negative sampling with log-odds correction.

Positives (target label 1) are always kept; a negative is kept iff ``u < r`` where
``u = splitmix64(fnv1a64(request_id \x1f item_id) ^ seed) / 2**64`` - deterministic across
processes, runs and machines (Python's ``hash()`` is salted per process, so never that), and
computed for a whole Arrow column at once (``uniform_for_keys``).
Every kept example carries ``sample_rate = r``, the negative rate in effect when it was drawn
(positives too: sampling shifts the odds of the whole stream, so the sampled-data logit of any
example is ``logit - log(r)``). Training fits ``logit - log(sample_rate)``; metrics weigh a
negative by ``1 / r`` and a positive by 1; serving undoes the sampling:
``p = p' / (p' + (1 - p') / r)``.

>>> sampler = NegativeSampler(rate=0.5, seed=7)
>>> sampler.decide("req-1", "item-9", positive=True)
(True, 0.5)
>>> [sampler.decide(f"r{i}", "x", positive=False)[0] for i in range(8)].count(True) in range(1, 8)
True
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from schemas.hashing import fnv1a64, splitmix64
from transforms.keys import join_key


def uniform_for_keys(seed: int, keys: pa.Array) -> np.ndarray:
    """A uniform number in [0, 1) per join key (``request_id \x1f item_id``), stable everywhere."""
    mixed = splitmix64(fnv1a64(keys) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def stable_uniform(seed: int, request_id: str, item_id: str) -> float:
    """``uniform_for_keys`` for one example."""
    return float(uniform_for_keys(seed, pa.array([join_key(request_id, item_id)]))[0])


def corrected_probability(p_sampled: float, rate: float) -> float:
    """Undo negative sampling at rate r: p = p' / (p' + (1 - p') / r)."""
    return p_sampled / (p_sampled + (1.0 - p_sampled) / rate)


class NegativeSampler:
    def __init__(self, rate: float, seed: int = 0):
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"negative sampling rate must be in (0, 1], got {rate}")
        self.rate, self.seed = rate, seed
        self.kept_negatives = 0
        self.dropped_negatives = 0
        self.positives = 0

    def decide(self, request_id: str, item_id: str, positive: bool) -> tuple[bool, float]:
        """(keep, sample_rate) for one example."""
        if positive:
            self.positives += 1
            return True, self.rate
        if self.rate >= 1.0 or stable_uniform(self.seed, request_id, item_id) < self.rate:
            self.kept_negatives += 1
            return True, self.rate
        self.dropped_negatives += 1
        return False, self.rate

    def decide_many(self, keys: pa.Array, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keep mask, sample rates) for a column of join keys; the same decisions as ``decide``."""
        positive = np.asarray(positive, bool)
        if self.rate >= 1.0:
            keep = np.ones(len(positive), bool)
        else:
            keep = positive | (uniform_for_keys(self.seed, keys) < self.rate)
        self.positives += int(positive.sum())
        self.kept_negatives += int((keep & ~positive).sum())
        self.dropped_negatives += int((~keep).sum())
        return keep, np.full(len(positive), self.rate)

    @property
    def counts(self) -> dict[str, int]:
        return {"positives": self.positives, "kept_negatives": self.kept_negatives,
                "dropped_negatives": self.dropped_negatives}
