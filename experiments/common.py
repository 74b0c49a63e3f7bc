"""What the experiments share: their Examples, scoring as serving scored, metrics and results.

Every AUC here is ``trainer.metrics.ProgressiveMetrics``' (binned, within ~1e-4 of the exact
AUC; negatives kept at sampling rate ``r`` weigh ``1 / r``), computed on the rows an experiment
names, so two arms are always compared on the same Examples.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from schemas.spec_types import FeatureSpec
from trainer.metrics import ProgressiveMetrics
from trainer.running import ORDER

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def load_examples(spec: FeatureSpec, log_dir: str | Path, limit: int | None = None) -> pa.Table:
    """The logs' Examples (joined, sampled, extracted as the job does) in the trainer's total
    order; the first ``limit`` of them when given."""
    from transforms.log_examples import examples_from_logs

    examples = examples_from_logs(spec, Path(log_dir)).sort_by(ORDER)
    if examples.num_rows == 0:
        raise ValueError(f"{log_dir}: the logs give no Examples for spec {spec.name!r}")
    return examples.slice(0, limit) if limit is not None else examples


def synthetic_logs(out: Path, impressions: int, span_hours: float, seed: int = 7) -> Path:
    """A drifting synthetic stream (``event_datasets.synthetic``, drift 0.5 over the span) under
    ``out``, made once (reused when its manifest names the same size)."""
    from event_datasets.synthetic import SyntheticConfig, generate

    manifest = out / "manifest.json"
    wanted = {"impressions": impressions, "span_hours": span_hours, "seed": seed}
    if manifest.is_file() and json.loads(manifest.read_text()).get("request") == wanted:
        return out
    made = generate(out, SyntheticConfig(events=impressions, seed=seed, span_hours=span_hours))
    manifest.write_text(json.dumps({**made, "request": wanted}, default=str))
    return out


def event_times(examples: pa.Table) -> np.ndarray:
    return examples.column("impression_time_ms").to_numpy().astype(np.int64)


def labels_and_weights(spec: FeatureSpec, examples: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Each Example's target label (0/1) and metric weight (1, or ``1 / r`` for a negative kept
    at sampling rate ``r``), as the trainer's metrics weigh them."""
    from trainer.metrics import metric_weights
    from trainer.ranking_model import target_labels

    labels = target_labels(examples, spec.labels.target)
    return labels, metric_weights(labels, examples.column("sample_rate").to_numpy())


def evaluate(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, rows: np.ndarray | None = None) -> dict:
    """AUC and logloss of logits ``scores`` on ``rows`` (a boolean mask; default all), leaving
    out rows without a score (NaN: no model served yet)."""
    keep = np.isfinite(scores) if rows is None else rows & np.isfinite(scores)
    metrics = ProgressiveMetrics()
    if keep.any():
        metrics.update(scores[keep], labels[keep], weights[keep])
    return {"auc": _rounded(metrics.auc), "logloss": _rounded(metrics.logloss), "examples": int(keep.sum())}


def _rounded(value: float, digits: int = 5) -> float | None:
    return None if not math.isfinite(value) else round(value, digits)


def serving_scores(model_dir: Path, examples: pa.Table, until_data_time_ms: int | None = None) -> np.ndarray:
    """The logit each Example got from the *serving* model (``serving.model.ServingModel``) as
    it stood at the Example's impression time: the snapshot and every version the trainer had
    published before that time (``data_time_ms`` earlier than it), applied in order. With
    ``until_data_time_ms`` no version published at or after that time is applied (a model
    frozen then). NaN where nothing was published yet."""
    from serving.model import ServingModel
    from trainer.publish import read_manifest

    entries = read_manifest(model_dir)
    published = np.array([entry["data_time_ms"] for entry in entries], dtype=np.int64)
    times = event_times(examples)
    newest = np.searchsorted(published, times, side="left") - 1  # the last version before each Example
    if until_data_time_ms is not None:
        newest = np.minimum(newest, np.searchsorted(published, until_data_time_ms, side="left") - 1)
    first_snapshot = next((i for i, entry in enumerate(entries) if entry["kind"] == "snapshot"), len(entries))
    scores = np.full(examples.num_rows, np.nan)
    serving = ServingModel(model_dir)
    starts = np.r_[0, np.flatnonzero(np.diff(newest)) + 1]
    for start, stop in zip(starts, np.r_[starts[1:], len(newest)]):
        index = int(newest[start])
        if index < first_snapshot:
            continue
        serving.refresh(until_version=entries[index]["version"], entries=entries)
        scores[start:stop] = serving.model.predict_logits(examples.slice(start, stop - start))
    return scores


def with_publish(spec: FeatureSpec, sparse_every_ms: int, dense_every_ms: int) -> FeatureSpec:
    """``spec`` publishing at these intervals and keeping every version (``serving_scores``
    replays serving as it stood at any time of the run)."""
    return dataclasses.replace(spec, publish=dataclasses.replace(spec.publish, sparse_every_ms=sparse_every_ms,
                                                                 dense_every_ms=dense_every_ms),
                               snapshot=dataclasses.replace(spec.snapshot, keep=None))


def duration(ms: int | None) -> str:
    """``90_000`` -> ``"1.5m"``; None -> ``"never"``."""
    if ms is None:
        return "never"
    for unit, size in (("d", DAY_MS), ("h", HOUR_MS), ("m", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms / size:g}{unit}"
    return f"{ms}ms"


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """A plain table on stdout (the command's last line is its JSON)."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(column), *(len(row[i]) for row in cells)) if cells else len(column)
              for i, column in enumerate(columns)]
    print(title)
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    for row in cells:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)))
    sys.stdout.flush()


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def write_result(out: Path, name: str, result: dict, plot) -> dict:
    """``out/NAME.json`` (strict JSON) and ``out/NAME.png`` (``plot(axes)`` draws it); returns
    ``result`` with both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from schemas.files import atomic_write
    from trainer.report import json_safe

    out.mkdir(parents=True, exist_ok=True)
    result = {"experiment": name, **result, "json": str(out / f"{name}.json"), "plot": str(out / f"{name}.png")}
    figure, axes = plt.subplots(figsize=(8, 4.5))
    plot(axes)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_write(out / f"{name}.png", "wb") as png:
        figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    with atomic_write(out / f"{name}.json", "w") as handle:
        json.dump(json_safe(result), handle, indent=1, allow_nan=False)
    return result


def predicted(trainer, examples: pa.Table, chunk: int = 65_536) -> np.ndarray:
    """``trainer``'s logits for ``examples`` without training (nothing inserted or updated)."""
    if examples.num_rows == 0:
        return np.zeros(0)
    return np.concatenate([trainer.predict_logits(examples.slice(start, chunk))
                           for start in range(0, examples.num_rows, chunk)])


def trained_progressively(trainer, examples: pa.Table, batch_size: int | None = None) -> np.ndarray:
    """Train ``trainer`` on ``examples`` in order; returns each Example's progressive logit
    (scored before it was learned), in ``examples``' order."""
    recorded = trainer.record_scores()
    trainer.train(examples, batch_size)
    trainer.metrics  # (folds the last batches in)
    return recorded.recorded()[0]
