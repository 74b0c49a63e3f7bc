"""Progressive and windowed metrics (trainer.metrics) against scikit-learn and per-window references."""
import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from trainer.metrics import ProgressiveMetrics, WindowedMetrics


def test_progressive_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    logits = rng.normal(-1.0, 1.5, 20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-logits))).astype(int)
    weights = np.where(labels == 1, 1.0, 1 / 0.25)  # negatives kept at rate 0.25
    metrics = ProgressiveMetrics()
    for part in np.array_split(np.arange(20_000), 7):
        metrics.update(logits[part], labels[part], weights[part])
    p = 1 / (1 + np.exp(-logits))
    assert metrics.auc == pytest.approx(roc_auc_score(labels, p, sample_weight=weights), abs=1e-4)
    assert metrics.logloss == pytest.approx(log_loss(labels, p, sample_weight=weights), rel=1e-9)
    assert metrics.calibration == pytest.approx((weights * p).sum() / (weights * labels).sum(), rel=1e-9)


def test_windowed_metrics_equal_progressive_metrics_per_window_and_count_late_examples():
    rng = np.random.default_rng(3)
    times = np.sort(rng.integers(0, 10_000, 3_000))
    labels = (rng.random(3_000) < 0.3).astype(float)
    logits = rng.normal(size=3_000) + labels
    weights = np.where(labels > 0, 1.0, 2.0)
    windows = WindowedMetrics(window_ms=1_000)
    rows = []
    for start in range(0, 3_000, 250):  # batches in time order, rows closing as data time passes
        part = slice(start, start + 250)
        windows.update(logits[part], labels[part], weights[part], times[part])
        rows += windows.close_until(int(times[part].max()))
    windows.update(logits[:5], labels[:5], weights[:5], times[:5])  # window 0 closed long ago
    rows += windows.flush()
    assert windows.late_examples == 5
    assert [row["window_start_ms"] for row in rows] == [w * 1_000 for w in range(10)]
    for row in rows:
        mask = (times // 1_000) == row["window_start_ms"] // 1_000
        reference = ProgressiveMetrics(bins=1 << 12)
        reference.update(logits[mask], labels[mask], weights[mask])
        assert row == {"window_start_ms": row["window_start_ms"], "window_ms": 1_000, **reference.summary()}
