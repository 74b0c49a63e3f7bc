"""Negative sampling with log-odds correction.

Positives (target label 1) are always kept; a negative is kept iff ``u < r`` where
``u = blake2b(seed | request_id | item_id)`` read as a uniform number in [0, 1) - deterministic
across processes, runs and machines (Python's ``hash()`` is salted per process, so never that).
The kept example carries ``sample_rate`` (1 for positives, ``r`` for negatives) so training can
use ``logit - log(sample_rate)`` and serving can undo the sampling:
``p = p' / (p' + (1 - p') / r)``.

>>> sampler = NegativeSampler(rate=0.5, seed=7)
>>> sampler.decide("req-1", "item-9", positive=True)
(True, 1.0)
>>> [sampler.decide(f"r{i}", "x", positive=False)[0] for i in range(8)].count(True) in range(1, 8)
True
"""
from __future__ import annotations

import hashlib
import math


def stable_uniform(seed: int, *parts: str) -> float:
    """A uniform number in [0, 1) from a 64-bit blake2b digest of ``seed`` and ``parts``."""
    digest = hashlib.blake2b("|".join((str(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def corrected_probability(p_sampled: float, rate: float) -> float:
    """Undo negative sampling at rate r: p = p' / (p' + (1 - p') / r)."""
    return p_sampled / (p_sampled + (1.0 - p_sampled) / rate)


def logit_offset(rate: float) -> float:
    """What training subtracts from the logit of an example kept at ``rate``: log(rate)."""
    return math.log(rate)


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
            return True, 1.0
        if self.rate >= 1.0 or stable_uniform(self.seed, request_id, item_id) < self.rate:
            self.kept_negatives += 1
            return True, self.rate
        self.dropped_negatives += 1
        return False, self.rate

    @property
    def counts(self) -> dict[str, int]:
        return {"positives": self.positives, "kept_negatives": self.kept_negatives,
                "dropped_negatives": self.dropped_negatives}
