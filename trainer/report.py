"""Reporting of a training run: metric rows per event-time window (JSON lines), a PNG plot of
them over event time, and a progress bar with examples/s for long runs."""
from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from schemas.files import atomic_write

AUC_EVERY_S = 0.5
METRICS = (("auc", "progressive AUC"), ("logloss", "logloss"), ("calibration", "calibration (pred / obs CTR)"))


def json_safe(value):
    """NaN and infinities (an AUC of one class, a rate of nothing) as null: valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_metric_rows(rows: Iterable[dict], path: str | Path) -> list[dict]:
    """Rows sorted by window start, written atomically as JSON lines; returns them."""
    rows = sorted(rows, key=lambda row: row["window_start_ms"])
    with atomic_write(Path(path), "w") as out:
        out.writelines(json.dumps(json_safe(row), allow_nan=False) + "\n" for row in rows)
    return rows


def read_metric_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(rows: list[dict], path: str | Path, title: str = "") -> None:
    """AUC, logloss, calibration and examples per window against event time (UTC), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [datetime.fromtimestamp(row["window_start_ms"] / 1000, tz=timezone.utc) for row in rows]
    figure, axes = plt.subplots(len(METRICS) + 1, 1, figsize=(9, 8), sharex=True)
    for axis, (key, label) in zip(axes, METRICS):
        axis.plot(times, [row[key] for row in rows], marker=".", linewidth=1)
        axis.set_ylabel(label, fontsize=8)
        axis.grid(alpha=0.3)
    axes[-2].axhline(1.0, color="grey", linewidth=0.8)
    axes[-1].bar(times, [row["examples"] for row in rows],
                 width=(rows[0]["window_ms"] / 86_400_000) * 0.8 if rows else 1.0)
    axes[-1].set_ylabel("examples", fontsize=8)
    axes[-1].set_xlabel("event time (UTC), window start")
    figure.suptitle(title or "progressive validation per event-time window")
    figure.autofmt_xdate()
    figure.tight_layout()
    with atomic_write(Path(path), "wb") as out:
        figure.savefig(out, format="png", dpi=100)
    plt.close(figure)


class Progress:
    """A progress bar on stderr (tqdm) with examples/s and the running AUC; a line every
    ``min_interval_s`` when stderr is not a terminal."""

    def __init__(self, total: int | None = None, description: str = "training", min_interval_s: float = 10.0):
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=description, unit="ex", unit_scale=True, file=sys.stderr,
                        mininterval=0.5 if interactive else min_interval_s, dynamic_ncols=interactive,
                        ascii=not interactive)
        self.auc_shown_at = -float("inf")

    def update(self, examples: int, metrics=None) -> None:
        """Count ``examples``; show ``metrics.auc`` (read at most every ``AUC_EVERY_S`` seconds:
        folding the scores in and summing the bins costs more than a small batch's step)."""
        now = time.monotonic()
        if metrics is not None and now - self.auc_shown_at >= AUC_EVERY_S:
            self.auc_shown_at = now
            self.bar.set_postfix_str(f"auc={metrics.auc:.4f}", refresh=False)
        self.bar.update(examples)

    def close(self) -> None:
        self.bar.close()
