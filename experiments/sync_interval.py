"""``sync-interval``: serving AUC against how often the trainer's parameters reach serving.

Monolith (Criteo, DeepFM): online training synced every 5 h / 1 h / 30 min served AUC 79.66 /
79.78 / 79.80, against 79.42-79.44 for batch training alone: the fresher the served model, the
better, and any online sync beats a model trained once.

Here one online training run per setting (the spec's trainer, batch and optimizers; the real
``trainer.running.RunningTrainer`` and ``trainer.publish.Publisher``) publishes to its own model
directory with sparse deltas every ``I`` of event time, I in {1 min, 10 min, 30 min, 1 h, 5 h},
and dense weights every 1 h or every ``I``; snapshots as the spec says. Then each Example is
scored by ``serving.model.ServingModel`` as it stood at the Example's impression time (the
snapshot and every version published before it), and the serving AUC is measured on the
Examples after the first ``frozen_after`` (default one day) of event time. Beside it: the
trainer's own progressive AUC on the same Examples (interval 0: every batch synced before the
next is scored - the limit) and the serving model frozen at ``frozen_after`` (batch training on
the first day only). Every run trains the same batches in the same order (the same progressive
AUC), so the arms differ only in what serving had.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from experiments.common import (
    DAY_MS,
    HOUR_MS,
    duration,
    evaluate,
    event_times,
    labels_and_weights,
    print_table,
    serving_scores,
    with_publish,
    write_result,
)
from schemas.spec_types import FeatureSpec
from trainer.running import PublishOptions, RunningTrainer

NAME = "sync-interval"
INTERVALS_MS = (60_000, 600_000, 1_800_000, HOUR_MS, 5 * HOUR_MS)


def train_and_publish(spec: FeatureSpec, examples: pa.Table, model_dir: Path, device: str) -> tuple[dict, np.ndarray]:
    """One online run publishing to ``model_dir``; returns its summary and the progressive
    logits of every Example (in ``examples``' order, which is the trainer's)."""
    shutil.rmtree(model_dir, ignore_errors=True)
    running = RunningTrainer(spec, device, progress=False, publishing=PublishOptions(str(model_dir)))
    recorded = running.trainer.record_scores()
    running.train([examples], flush=True)
    running.finish()
    summary = running.summary()
    running.close()
    return summary, recorded.recorded()[0]


def run(spec: FeatureSpec, examples: pa.Table, out: Path, quick: bool = False, device: str = "cpu",
        frozen_after_ms: int = DAY_MS, intervals_ms: tuple[int, ...] = INTERVALS_MS) -> dict:
    times = event_times(examples)
    start = int(times.min())
    if int(times.max()) - start <= frozen_after_ms:
        raise ValueError(f"the Examples span {duration(int(times.max()) - start)} of event time: sync-interval needs "
                         f"more than --frozen-after ({duration(frozen_after_ms)}) to score after it")
    labels, weights = labels_and_weights(spec, examples)
    scored = times >= start + frozen_after_ms
    dense_modes = ("1h",) if quick else ("1h", "same")
    settings = [(interval, HOUR_MS if mode == "1h" else interval) for mode in dense_modes for interval in intervals_ms
                if mode == "1h" or interval != HOUR_MS]
    rows, limit, frozen, progressive = [], None, None, set()
    for sparse_ms, dense_ms in settings:
        model_dir = out / "models" / f"sparse-{duration(sparse_ms)}-dense-{duration(dense_ms)}"
        summary, trainer_scores = train_and_publish(with_publish(spec, sparse_ms, dense_ms), examples, model_dir,
                                                    device)
        progressive.add(summary["auc"])
        if limit is None:
            limit = evaluate(trainer_scores, labels, weights, scored)
            frozen = evaluate(serving_scores(model_dir, examples, until_data_time_ms=start + frozen_after_ms),
                              labels, weights, scored)
        served = evaluate(serving_scores(model_dir, examples), labels, weights, scored)
        versions = len(list(model_dir.glob("v*")))
        rows.append({"sparse_every": duration(sparse_ms), "sparse_every_ms": sparse_ms,
                     "dense_every": duration(dense_ms), "dense_every_ms": dense_ms,
                     "serving_auc": served["auc"], "serving_logloss": served["logloss"],
                     "scored_examples": served["examples"], "versions": versions})
        shutil.rmtree(model_dir)
    shutil.rmtree(out / "models", ignore_errors=True)
    by_dense = {}
    for row in rows:
        by_dense.setdefault(row["dense_every"] if row["dense_every_ms"] == HOUR_MS else "same", []).append(row)
    monotone = {mode: all(a["serving_auc"] >= b["serving_auc"] for a, b in zip(series, series[1:]))
                for mode, series in by_dense.items()}
    result = {"spec": spec.name, "examples": examples.num_rows, "span": duration(int(times.max()) - start),
              "frozen_after": duration(frozen_after_ms), "scored_examples": limit["examples"],
              "trainer_progressive_auc": limit["auc"], "trainer_progressive_logloss": limit["logloss"],
              "frozen_auc": frozen["auc"], "frozen_logloss": frozen["logloss"], "runs": rows,
              "serving_auc_non_increasing": monotone, "identical_training": len(progressive) == 1, "quick": quick}
    print_table(f"{NAME}: serving AUC on the {limit['examples']:,} Examples after the first "
                f"{duration(frozen_after_ms)} ({spec.name}, {examples.num_rows:,} Examples over {result['span']})",
                ["sparse every", "dense every", "serving AUC", "logloss", "versions"],
                [["0 (trainer)", "0", limit["auc"], limit["logloss"], None]]
                + [[r["sparse_every"], r["dense_every"], r["serving_auc"], r["serving_logloss"], r["versions"]]
                   for r in rows]
                + [[f"frozen at {duration(frozen_after_ms)}", "-", frozen["auc"], frozen["logloss"], None]])

    def plot(axes) -> None:
        for mode, series in by_dense.items():
            axes.plot([r["sparse_every_ms"] / 60_000 for r in series], [r["serving_auc"] for r in series], marker="o",
                      label=f"serving, dense every {'1h' if mode != 'same' else 'same interval'}")
        axes.axhline(limit["auc"], color="green", linestyle="--", label="trainer (interval 0)")
        axes.axhline(frozen["auc"], color="red", linestyle=":", label=f"frozen after {duration(frozen_after_ms)}")
        axes.set_xscale("log")
        axes.set_xlabel("sparse sync interval (minutes of event time)")
        axes.set_ylabel("AUC")
        axes.set_title(f"{NAME}: {spec.name}, {examples.num_rows:,} Examples")
        axes.legend(fontsize=8)

    return write_result(out, NAME, result, plot)
