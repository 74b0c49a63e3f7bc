"""A synthetic Criteo-like event stream for scale and large-batch work.

Impressions carry 13 dense counts ``I1..I13`` and 26 categorical ids ``C1..C26``:

* ids: a rank ``r`` is drawn from a truncated power law (Zipf, exponent ``s``) over the field's
  cardinality, ``r = floor((1 + u (card^(1-s) - 1))^(1/(1-s)))``; for fields with at least
  ``CHURN_MIN_CARDINALITY`` ids the ranking slides by ``churn_per_day * card`` ids a day, so
  new ids appear (and old ones fade) over time. The stored id is a 62-bit mix of (field, id).
* clicks: a hidden teacher gives ``logit = b + sum_f w_f(id_f) + FM(v_f(id_f), f in FM_FIELDS)
  + sum_j beta_j z_j`` (z_j the standardised log count); weights are derived from hashes of the
  ids, so they need no table. Concept drift: the teacher moves linearly from weights A to
  weights B, ``logit_t = (1 - a_t) logit_A + a_t logit_B`` with ``a_t = drift * t / span``.
  ``b`` is set so the first chunk's mean CTR is ``target_ctr``. ``click ~ Bernoulli(sigmoid(logit_t))``,
  so the best achievable AUC (the teacher's own) is known: it is reported as ``teacher_auc``.
* actions: each click arrives after a log-normal delay (median ``delay_median_s``, shape
  ``delay_sigma``, capped at ``MAX_DELAY_MS``); a few land after a typical join window.
* missing values: a third of the fields are null at a per-field rate up to ``max_missing_rate``.

``C3`` is the user field and ``C12`` the item field: ``user_id`` / ``item_id`` hold their ids.
Everything is drawn from ``numpy.random.default_rng((seed, chunk))``: a seed gives identical bytes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.events import load_schema
from schemas.hashing import splitmix64
from schemas.log_writer import SpanWriter, write_manifest
from schemas.logs import HOUR_MS

NUM_DENSE = 13
NUM_CATEGORICAL = 26
USER_FIELD = 2  # C3
ITEM_FIELD = 11  # C12
FM_FIELDS = (USER_FIELD, ITEM_FIELD, 0, 5, 8, 13, 16, 22)
FM_DIM = 4
CHURN_MIN_CARDINALITY = 1_000
MAX_DELAY_MS = 6 * HOUR_MS
#: Loosely Criteo's per-field cardinalities, capped so a laptop can hold the tables.
DEFAULT_CARDINALITIES = (
    1_460, 583, 200_000, 100_000, 305, 24, 12_517, 633, 3, 93_145, 5_683, 150_000, 3_194,
    27, 14_992, 120_000, 10, 5_652, 2_173, 4, 180_000, 18, 15, 86_000, 105, 47_000,
)
_MASK62 = np.uint64((1 << 62) - 1)


@dataclass(frozen=True)
class SyntheticConfig:
    events: int = 1_000_000  # impressions
    seed: int = 0
    start_ms: int = 1_767_225_600_000  # 2026-01-01T00:00Z
    span_hours: float = 24.0  # event time covered by the impressions
    cardinalities: tuple[int, ...] = DEFAULT_CARDINALITIES
    zipf_exponent: float = 1.1
    churn_per_day: float = 0.2  # share of a field's ids the popularity ranking slides per day
    target_ctr: float = 0.2
    drift: float = 0.5  # 0: a fixed teacher; 1: entirely new weights by the end of the span
    weight_scale: float = 0.6  # teacher per-id weight ~ U(-scale, scale)
    max_missing_rate: float = 0.3
    delay_median_s: float = 60.0
    delay_sigma: float = 1.0
    chunk_size: int = 200_000

    def __post_init__(self):
        if self.events <= 0:
            raise ValueError(f"events must be > 0, got {self.events}")
        if len(self.cardinalities) != NUM_CATEGORICAL or min(self.cardinalities) < 2:
            raise ValueError(f"cardinalities must be {NUM_CATEGORICAL} values >= 2, got {self.cardinalities}")
        if not 0 < self.target_ctr < 1:
            raise ValueError(f"target_ctr must be in (0, 1), got {self.target_ctr}")
        if self.zipf_exponent <= 1.0:
            raise ValueError(f"zipf_exponent must be > 1, got {self.zipf_exponent}")
        if not 0 <= self.drift <= 1:
            raise ValueError(f"drift must be in [0, 1], got {self.drift}")

    @property
    def span_ms(self) -> int:
        return int(self.span_hours * HOUR_MS)


def mix64(values: np.ndarray, salt: int) -> np.ndarray:
    """A well-spread 64-bit hash of ``values`` under ``salt`` (``schemas.hashing.splitmix64``)."""
    return splitmix64(values, salt)


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by ranks (ties get their average rank): (sum of positive ranks - P(P+1)/2) / (P N)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


class _Teacher:
    """Two sets of hidden weights (A at the start, B at the end of the span), derived from hashes.

    One 64-bit hash of (seed, field, id) gives both per-id weights (its high and low 32 bits);
    two more give the FM vectors of A and B (four 16-bit parts each).
    """

    def __init__(self, seed: int, scale: float, field_scales: np.ndarray, betas_a: np.ndarray,
                 betas_b: np.ndarray):
        self.salt = seed * 0x2545F4914F6CDD1D
        self.field_scales = field_scales * scale
        self.betas_a, self.betas_b = betas_a, betas_b

    @staticmethod
    def _fm_vectors(hashes: np.ndarray, mask: np.ndarray) -> np.ndarray:
        parts = hashes.view(np.uint16).reshape(len(hashes), FM_DIM).astype(np.float64)
        return (parts * (1.0 / 65536.0) - 0.5) * mask[:, None]

    def logits(self, ids: list[np.ndarray], present: list[np.ndarray],
               dense_z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(dense_z)
        logit_a, logit_b = dense_z @ self.betas_a, dense_z @ self.betas_b
        fm_sum = np.zeros((2, n, FM_DIM))
        fm_sq = np.zeros((2, n))
        to_unit = 2.0 / (1 << 32)
        for field, (values, mask) in enumerate(zip(ids, present)):
            h = mix64(values, self.salt + field)
            weight = self.field_scales[field] * mask
            logit_a += ((h >> np.uint64(32)).astype(np.float64) * to_unit - 1.0) * weight
            logit_b += ((h & np.uint64(0xFFFFFFFF)).astype(np.float64) * to_unit - 1.0) * weight
            if field in FM_FIELDS:
                for which in range(2):
                    v = self._fm_vectors(mix64(values, self.salt + 7919 * (field + 1) + which), mask)
                    fm_sum[which] += v
                    fm_sq[which] += np.einsum("ij,ij->i", v, v)
        fm = 0.5 * (np.einsum("wij,wij->wi", fm_sum, fm_sum) - fm_sq)
        return logit_a + fm[0], logit_b + fm[1]


class SyntheticStream:
    """Generates the stream chunk by chunk; ``chunks()`` yields (impressions, actions, p_click)."""

    def __init__(self, config: SyntheticConfig):
        self.config = config
        setup = np.random.default_rng([config.seed, 1 << 30])
        self.missing_rates = np.where(setup.random(NUM_CATEGORICAL + NUM_DENSE) < 1 / 3,
                                      setup.uniform(0, config.max_missing_rate, NUM_CATEGORICAL + NUM_DENSE), 0.0)
        self.missing_rates[[USER_FIELD, ITEM_FIELD]] = 0.0
        self.dense_mu = setup.uniform(0.5, 3.0, NUM_DENSE)
        self.dense_sigma = setup.uniform(0.5, 1.5, NUM_DENSE)
        field_scales = setup.uniform(0.3, 1.0, NUM_CATEGORICAL)
        self.teacher = _Teacher(config.seed, config.weight_scale, field_scales,
                                setup.normal(0, 0.15, NUM_DENSE), setup.normal(0, 0.15, NUM_DENSE))
        self.bias: float | None = None

    def _ids(self, rng: np.random.Generator, n: int, t_days: np.ndarray) -> tuple[list, list]:
        s = self.config.zipf_exponent
        raw_ids, present = [], []
        for field, card in enumerate(self.config.cardinalities):
            u = rng.random(n, dtype=np.float32)
            base = np.float32(card ** (1.0 - s) - 1.0)
            rank = np.floor((1.0 + u * base) ** np.float32(1.0 / (1.0 - s))).astype(np.int64)
            np.clip(rank, 1, card, out=rank)
            if card >= CHURN_MIN_CARDINALITY:
                rank += np.floor(t_days * self.config.churn_per_day * card).astype(np.int64)
            raw_ids.append(rank)
            rate = self.missing_rates[field]
            present.append(rng.random(n, dtype=np.float32) >= rate if rate > 0 else np.ones(n, dtype=bool))
        return raw_ids, present

    def _calibrate(self, logits: np.ndarray) -> float:
        """The bias b with mean(sigmoid(logits + b)) == target_ctr (bisection)."""
        low, high = -30.0, 30.0
        for _ in range(60):
            mid = (low + high) / 2
            if (1 / (1 + np.exp(-(logits + mid)))).mean() < self.config.target_ctr:
                low = mid
            else:
                high = mid
        return (low + high) / 2

    def chunk(self, index: int) -> tuple[pa.Table, pa.Table, np.ndarray]:
        config = self.config
        start = index * config.chunk_size
        n = min(config.chunk_size, config.events - start)
        rng = np.random.default_rng([config.seed, index])
        position = np.arange(start, start + n)
        offsets = np.floor((position + rng.random(n)) * (config.span_ms / config.events)).astype(np.int64)
        times = config.start_ms + offsets
        t_days = offsets / (24 * HOUR_MS)
        raw_ids, present = self._ids(rng, n, t_days)

        dense_log = rng.normal(self.dense_mu, self.dense_sigma, size=(n, NUM_DENSE))
        dense_counts = np.floor(np.expm1(np.clip(dense_log, 0, None)))
        dense_present = rng.random((n, NUM_DENSE)) >= self.missing_rates[NUM_CATEGORICAL:]
        dense_z = np.where(dense_present, (np.log1p(dense_counts) - self.dense_mu) / self.dense_sigma, 0.0)

        logit_a, logit_b = self.teacher.logits(raw_ids, present, dense_z)
        weight_b = config.drift * offsets / config.span_ms
        logits = (1 - weight_b) * logit_a + weight_b * logit_b
        if self.bias is None:
            self.bias = self._calibrate(logits)
        p_click = 1 / (1 + np.exp(-(logits + self.bias)))
        clicks = rng.random(n) < p_click
        delays = np.exp(rng.normal(np.log(config.delay_median_s * 1000), config.delay_sigma, n))
        delays = np.minimum(np.round(delays), MAX_DELAY_MS).astype(np.int64)

        stored_ids = [(mix64(ids, 0xC0FFEE + field) & _MASK62).astype(np.int64) for field, ids in enumerate(raw_ids)]
        request_ids = pc.binary_join_element_wise(f"syn{config.seed}-", pa.array(position).cast(pa.string()), "")
        user_ids = pa.array(stored_ids[USER_FIELD]).cast(pa.string())
        item_ids = pa.array(stored_ids[ITEM_FIELD]).cast(pa.string())
        columns = {
            "request_id": request_ids,
            "user_id": user_ids,
            "item_id": item_ids,
            "event_time_ms": pa.array(times),
            "position": pa.array(rng.integers(0, 10, n, dtype=np.int32)),
        }
        for j in range(NUM_DENSE):
            columns[f"I{j + 1}"] = pa.array(dense_counts[:, j], mask=~dense_present[:, j])
        for field in range(NUM_CATEGORICAL):
            columns[f"C{field + 1}"] = pa.array(stored_ids[field], mask=~present[field])
        impressions = pa.table(columns)

        clicked = pa.array(np.flatnonzero(clicks))
        actions = pa.table({
            "request_id": request_ids.take(clicked),
            "item_id": item_ids.take(clicked),
            "user_id": user_ids.take(clicked),
            "action_type": pa.array(["click"]).take(pa.array(np.zeros(len(clicked), dtype=np.int32))),
            "event_time_ms": pa.array(times[clicks] + delays[clicks]),
            "value": pa.array(np.ones(len(clicked))),
        })
        return impressions, actions, p_click

    def chunks(self):
        for index in range(-(-self.config.events // self.config.chunk_size)):
            yield self.chunk(index)


def generate(out_dir: str | Path, config: SyntheticConfig, fmt: str = "parquet") -> dict:
    """Write the stream's logs under ``out_dir`` (one file per hour); returns the manifest."""
    stream = SyntheticStream(config)
    impression_writer = SpanWriter(out_dir, "impressions", load_schema("synthetic_impression"), fmt, HOUR_MS,
                                   background=True)
    action_writer = SpanWriter(out_dir, "actions", load_schema("action"), fmt, HOUR_MS, background=True)
    probabilities, labels = [], []
    clicks = 0
    for impressions, actions, p_click in stream.chunks():
        impression_writer.add(impressions)
        action_writer.add(actions)
        first_time = impressions.column("event_time_ms")[0].as_py()
        impression_writer.flush(first_time)
        action_writer.flush(first_time)
        probabilities.append(p_click)
        label = np.zeros(impressions.num_rows, dtype=bool)
        positions = pc.index_in(actions.column("request_id"), impressions.column("request_id")).to_numpy()
        label[positions] = True
        labels.append(label)
        clicks += actions.num_rows
    impression_files = impression_writer.close()
    action_files = action_writer.close()
    probabilities = np.concatenate(probabilities)
    labels = np.concatenate(labels)
    manifest = {
        "dataset": "synthetic-criteo-like",
        "spec": "synthetic",
        "format": fmt,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        "impressions": config.events,
        "actions": {"click": clicks},
        "ctr": clicks / config.events,
        "teacher_auc": round(exact_auc(probabilities, labels), 6),
        "files": {"impressions": len(impression_files), "actions": len(action_files)},
        "action_delay": f"log-normal, median {config.delay_median_s:g} s, sigma {config.delay_sigma:g}, "
                        f"capped at {MAX_DELAY_MS // HOUR_MS} h",
    }
    write_manifest(out_dir, manifest)
    return manifest

