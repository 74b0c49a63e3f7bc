"""Progressive-validation metrics: each batch is scored before it is trained on.

Streaming and bounded in memory: scores are binned on the logit scale (``bins`` bins over
``[-logit_range, logit_range]``; resolution 2 * 20 / 65536 ~ 6e-4 in logit), so the AUC is
that of the binned scores (ties within a bin count half), within ~1e-4 of the exact AUC on
real data (tested against scikit-learn). Every example carries a weight: negatives kept at
sampling rate ``r`` weigh ``1 / r``, so the figures describe unsampled traffic.

* AUC: sum over bins of ``pos(b) * (neg(< b) + neg(b) / 2)`` / (total pos * total neg), weighted;
* logloss: weighted mean of ``-(y log p + (1 - y) log(1 - p))``;
* calibration: weighted predicted CTR / weighted observed CTR (1 is perfect).
"""
from __future__ import annotations

import numpy as np


class ProgressiveMetrics:
    def __init__(self, bins: int = 1 << 16, logit_range: float = 20.0):
        self.bins, self.logit_range = bins, logit_range
        self.reset()

    def reset(self) -> None:
        self.positive = np.zeros(self.bins)
        self.negative = np.zeros(self.bins)
        self.loss_sum = 0.0
        self.weight_sum = 0.0
        self.predicted_sum = 0.0
        self.observed_sum = 0.0
        self.examples = 0

    def update(self, logits, labels, weights=None) -> None:
        """Add a batch: ``logits`` (calibrated to unsampled traffic), labels 0/1, example weights."""
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels, dtype=np.float64).reshape(-1)
        weights = np.ones_like(logits) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        if not np.isfinite(logits).all():
            bad = int((~np.isfinite(logits)).sum())
            raise ValueError(f"{bad} of {len(logits)} logits are not finite (after {self.examples} examples): "
                             f"training diverged; lower the learning rates")
        clipped = np.clip(logits, -self.logit_range, self.logit_range)
        index = ((clipped + self.logit_range) / (2 * self.logit_range) * (self.bins - 1)).round().astype(np.int64)
        np.add.at(self.positive, index, weights * labels)
        np.add.at(self.negative, index, weights * (1 - labels))
        # log(sigmoid(x)) and log(1 - sigmoid(x)) computed stably
        log_p = -np.logaddexp(0.0, -logits)
        log_not_p = -np.logaddexp(0.0, logits)
        self.loss_sum += float(-(weights * (labels * log_p + (1 - labels) * log_not_p)).sum())
        self.weight_sum += float(weights.sum())
        self.predicted_sum += float((weights * np.exp(log_p)).sum())
        self.observed_sum += float((weights * labels).sum())
        self.examples += len(logits)

    @property
    def auc(self) -> float:
        total_pos, total_neg = self.positive.sum(), self.negative.sum()
        if total_pos == 0 or total_neg == 0:
            return float("nan")
        negatives_below = np.cumsum(self.negative) - self.negative
        return float((self.positive * (negatives_below + self.negative / 2)).sum() / (total_pos * total_neg))

    @property
    def logloss(self) -> float:
        return self.loss_sum / self.weight_sum if self.weight_sum else float("nan")

    @property
    def calibration(self) -> float:
        return self.predicted_sum / self.observed_sum if self.observed_sum else float("nan")

    def state_dict(self) -> dict:
        """Plain data (tensors, numbers) for a snapshot that loads without running code."""
        import torch

        return {"positive": torch.from_numpy(self.positive), "negative": torch.from_numpy(self.negative),
                "loss_sum": self.loss_sum, "weight_sum": self.weight_sum, "predicted_sum": self.predicted_sum,
                "observed_sum": self.observed_sum, "examples": self.examples}

    def load_state_dict(self, state: dict) -> None:
        self.positive, self.negative = state["positive"].numpy().copy(), state["negative"].numpy().copy()
        if len(self.positive) != self.bins:
            raise ValueError(f"metrics state has {len(self.positive)} bins, expected {self.bins}")
        for key in ("loss_sum", "weight_sum", "predicted_sum", "observed_sum"):
            setattr(self, key, float(state[key]))
        self.examples = int(state["examples"])

    def summary(self) -> dict:
        return {"examples": self.examples, "auc": round(self.auc, 5), "logloss": round(self.logloss, 5),
                "calibration": round(self.calibration, 4)}


def metric_weights(labels: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Each example's metric weight: 1 for a positive, ``1 / r`` for a negative kept at sampling
    rate ``r`` (so the figures describe unsampled traffic)."""
    return np.where(labels > 0, 1.0, 1.0 / rates)


class RecordingMetrics(ProgressiveMetrics):
    """Progressive metrics that also keep every score, label and weight in the order they came
    (a trainer's: its training order), for exact AUCs and per-example comparisons."""

    def reset(self) -> None:
        super().reset()
        self.scores, self.labels, self.weights = [], [], []

    def update(self, logits, labels, weights=None) -> None:
        super().update(logits, labels, weights)
        self.scores.append(np.asarray(logits, dtype=np.float64).reshape(-1))
        self.labels.append(np.asarray(labels, dtype=np.float64).reshape(-1))
        self.weights.append(np.ones(len(self.scores[-1])) if weights is None else
                            np.asarray(weights, dtype=np.float64).reshape(-1))

    def recorded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, labels, weights) of every example so far."""
        if not self.scores:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        return np.concatenate(self.scores), np.concatenate(self.labels), np.concatenate(self.weights)


class WindowedMetrics:
    """Progressive metrics per window of event time (``window_ms``), as rows for a report.

    An example counts in the window of its impression time, ``floor(t / window_ms)``. A window
    is closed (its row final) once the data time passes its end by one more window, allowing
    that much disorder; ``flush`` closes the rest. Each open window keeps ``bins`` bins.
    """

    def __init__(self, window_ms: int, bins: int = 1 << 12):
        if window_ms <= 0:
            raise ValueError(f"metrics window must be positive, got {window_ms} ms")
        self.window_ms, self.bins = window_ms, bins
        self.open: dict[int, ProgressiveMetrics] = {}
        self.late_examples = 0  # examples of a window already closed (not counted in a row)
        self.closed_before = None  # windows below this index are closed
        self.closed_rows: list[dict] = []  # every row closed so far (kept in snapshots)
        self._restored_rows: list[dict] = []  # rows of a restored state, given out again by the next close

    def update(self, logits, labels, weights, times_ms) -> None:
        logits, labels, weights = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (logits, labels, weights))
        index = np.asarray(times_ms, dtype=np.int64) // self.window_ms
        for window in np.unique(index):
            if self.closed_before is not None and window < self.closed_before:
                self.late_examples += int((index == window).sum())
                continue
            mask = index == window
            metrics = self.open.setdefault(int(window), ProgressiveMetrics(bins=self.bins))
            metrics.update(logits[mask], labels[mask], weights[mask])

    def state_dict(self) -> dict:
        return {"late_examples": self.late_examples, "closed_before": self.closed_before,
                "open": {window: metrics.state_dict() for window, metrics in self.open.items()},
                "closed_rows": [dict(row) for row in self.closed_rows]}

    def load_state_dict(self, state: dict) -> None:
        self.late_examples, self.closed_before = int(state["late_examples"]), state["closed_before"]
        self.closed_rows = [dict(row) for row in state.get("closed_rows", [])]
        self._restored_rows = list(self.closed_rows)  # a resumed run's report holds them too
        self.open = {}
        for window, metrics_state in state["open"].items():
            self.open[int(window)] = metrics = ProgressiveMetrics(bins=self.bins)
            metrics.load_state_dict(metrics_state)

    def close_until(self, data_time_ms: int) -> list[dict]:
        """Rows of the windows that ended at least one window before ``data_time_ms``."""
        limit = data_time_ms // self.window_ms - 1
        return self._close([w for w in self.open if w < limit], limit)

    def flush(self) -> list[dict]:
        return self._close(list(self.open), max(self.open, default=-1) + 1)

    def _close(self, windows: list[int], closed_before: int) -> list[dict]:
        self.closed_before = max(closed_before, self.closed_before if self.closed_before is not None else closed_before)
        rows, self._restored_rows = self._restored_rows, []
        for window in sorted(windows):
            metrics = self.open.pop(window)
            row = {"window_start_ms": window * self.window_ms, "window_ms": self.window_ms, **metrics.summary()}
            rows.append(row)
            self.closed_rows.append(row)
        return rows
