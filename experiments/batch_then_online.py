"""``batch-then-online``: batch training on history, then online training on the rest.

Monolith trains a model in batch on historical data and then keeps training it online on the
stream; its claim is that this beats batch training alone (the model stays as it was trained).

Phase 1 trains on the Examples before the split (by default the first half of the event-time
span) in batch mode: batch ``scale`` x the spec's, CowClip on, by CowClip's scaling rule
(``trainer.backfill.large_batch_spec``), ``epochs`` passes. Phase 2 continues on the rest
online with the spec's own settings (small batches), on the same tables in memory
(``OnlineTrainer.continue_from``: rows, optimizer state and dense weights carried over, no
restart). Measured on the online part, every arm scoring each Example before it learns it:

* ``batch_then_online``: phase 1, then phase 2 (progressive AUC of phase 2);
* ``batch_only``: the phase-1 model frozen, scoring the online part;
* ``online_from_scratch``: the spec's online trainer starting at the split with no model;
* ``online_throughout``: the spec's online trainer over all the logs, history included.

``streamrec run --backfill-until TIME`` runs the same two phases as a job: phase 1 in the driver
(``trainer.backfill``), handed to the job as a snapshot of its model directory; the job resumes
from it and trains online what comes after (the ``batch_then_online`` arm, on any runner).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from experiments.common import (
    duration,
    evaluate,
    event_times,
    labels_and_weights,
    predicted,
    print_table,
    trained_progressively,
    write_result,
)
from schemas.spec_types import FeatureSpec
from trainer.backfill import large_batch_spec

NAME = "batch-then-online"


def run(spec: FeatureSpec, examples: pa.Table, out: Path, quick: bool = False, device: str = "cpu",
        split_fraction: float = 0.5, scale: int = 16, epochs: int | None = None) -> dict:
    from trainer.online import OnlineTrainer

    if not 0 < split_fraction < 1:
        raise ValueError(f"split_fraction must be in (0, 1), got {split_fraction}")
    epochs = epochs or (1 if quick else 2)
    times = event_times(examples)
    split_ms = int(times.min() + split_fraction * (times.max() - times.min()))
    cut = int(np.searchsorted(times, split_ms, side="left"))
    history, rest = examples.slice(0, cut), examples.slice(cut)
    if history.num_rows == 0 or rest.num_rows == 0:
        raise ValueError(f"the split at {split_fraction:.0%} of the span leaves no history or no online part")
    labels, weights = labels_and_weights(spec, rest)
    batch_spec = large_batch_spec(spec, spec.training.batch_size * scale, cowclip=True)

    batch = OnlineTrainer(batch_spec, device=device)
    for _ in range(epochs):
        batch.train(history)
    frozen = evaluate(predicted(batch, rest), labels, weights)
    continued = OnlineTrainer(spec, device=device)
    continued.continue_from(batch)
    then_online = evaluate(trained_progressively(continued, rest), labels, weights)
    scratch = evaluate(trained_progressively(OnlineTrainer(spec, device=device), rest), labels, weights)
    throughout_scores = trained_progressively(OnlineTrainer(spec, device=device), examples)[cut:]
    throughout = evaluate(throughout_scores, labels, weights)

    arms = {"batch_then_online": then_online, "batch_only": frozen, "online_from_scratch": scratch,
            "online_throughout": throughout}
    result = {"spec": spec.name, "examples": examples.num_rows, "history_examples": history.num_rows,
              "online_examples": rest.num_rows, "split_fraction": split_fraction,
              "history_span": duration(split_ms - int(times.min())), "online_span": duration(int(times.max()) - split_ms),
              "phase1": {"batch_size": batch_spec.training.batch_size, "epochs": epochs, "cowclip": True,
                         "dense_lr": batch_spec.training.dense_optimizer.lr,
                         "warmup_steps": batch_spec.training.warmup_steps},
              "phase2_batch_size": spec.training.batch_size, "arms": arms,
              "batch_then_online_minus_batch_only": _gap(then_online, frozen),
              "batch_then_online_minus_online_from_scratch": _gap(then_online, scratch), "quick": quick}
    print_table(f"{NAME}: AUC on the online part ({rest.num_rows:,} Examples over {result['online_span']}; phase 1: "
                f"{history.num_rows:,} Examples, batch {batch_spec.training.batch_size}, {epochs} epoch(s), CowClip)",
                ["arm", "AUC", "logloss"], [[name, arm["auc"], arm["logloss"]] for name, arm in arms.items()])

    def plot(axes) -> None:
        names = list(arms)
        axes.bar(range(len(names)), [arms[name]["auc"] or 0 for name in names], color="tab:blue")
        axes.set_xticks(range(len(names)), [name.replace("_", " ") for name in names], fontsize=8)
        low = min(arm["auc"] for arm in arms.values() if arm["auc"] is not None)
        axes.set_ylim(low - 0.02, None)
        axes.set_ylabel("AUC on the online part")
        axes.set_title(f"{NAME}: {spec.name}")

    return write_result(out, NAME, result, plot)


def _gap(a: dict, b: dict) -> float | None:
    return None if a["auc"] is None or b["auc"] is None else round(a["auc"] - b["auc"], 5)
