"""``cowclip-batch``: test AUC from a small to a 64x larger batch, with and without CowClip.

CowClip (DeepFM on Criteo): with its scaling rule and per-id adaptive clipping the AUC holds
from batch 1K to 128K - 80.86 at 1K, 80.97 at 8K, 80.90 at 128K - where plain large-batch
training loses it.

The first 80 % of the Examples (in time order) train for ``epochs`` passes, the last 20 % test
(scored without training). Batches ``base``, 8 x and 64 x ``base`` (1K, 8K, 64K; ``--quick``:
64, 512, 4K), each with and without CowClip's clipping; the scaling rule
(``trainer.backfill.large_batch_spec``: embedding L2 x s, dense lr x sqrt(s), warm-up) applies
in both arms. The data should give the largest batch at least 50 steps an epoch (the
default synthetic stream of 4.1M impressions does: 3.28M training rows / 64K); the result names
the steps it had.
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from experiments.common import evaluate, labels_and_weights, predicted, print_table, write_result
from schemas.spec_types import FeatureSpec
from trainer.backfill import large_batch_spec

NAME = "cowclip-batch"
SCALES = (1, 8, 64)


def train_test(spec: FeatureSpec, train: pa.Table, test: pa.Table, epochs: int, device: str) -> dict:
    """Train ``spec``'s trainer on ``train`` for ``epochs`` passes; the AUC of ``test``."""
    from trainer.online import OnlineTrainer

    trainer = OnlineTrainer(spec, device=device)
    started = time.perf_counter()
    for _ in range(epochs):
        trainer.train(train)
    seconds = time.perf_counter() - started
    labels, weights = labels_and_weights(spec, test)
    tested = evaluate(predicted(trainer, test), labels, weights)
    return {"test_auc": tested["auc"], "test_logloss": tested["logloss"], "steps": trainer.batches,
            "train_seconds": round(seconds, 1), "train_examples_per_s": round(epochs * train.num_rows / seconds)}


def run(spec: FeatureSpec, examples: pa.Table, out: Path, quick: bool = False, device: str = "cpu",
        base_batch: int | None = None, epochs: int = 1, train_fraction: float = 0.8) -> dict:
    base_batch = base_batch or (64 if quick else 1024)
    cut = int(examples.num_rows * train_fraction)
    train, test = examples.slice(0, cut), examples.slice(cut)
    if train.num_rows < base_batch * SCALES[-1]:
        raise ValueError(f"{train.num_rows:,} training Examples do not fill one batch of {base_batch * SCALES[-1]:,}")
    runs = []
    for scale in SCALES:
        for cowclip in (True, False):
            arm = large_batch_spec(spec, base_batch * scale, cowclip=cowclip, base_batch=base_batch)
            runs.append({"batch": base_batch * scale, "scale": scale, "cowclip": cowclip,
                         "dense_lr": arm.training.dense_optimizer.lr, "warmup_steps": arm.training.warmup_steps,
                         "steps_per_epoch": -(-train.num_rows // (base_batch * scale)),
                         **train_test(arm, train, test, epochs, device)})
    by = {(r["scale"], r["cowclip"]): r for r in runs}
    base, largest = by[(1, True)], by[(SCALES[-1], True)]
    relative = None if base["test_auc"] is None or largest["test_auc"] is None else \
        round((largest["test_auc"] - base["test_auc"]) / base["test_auc"], 5)
    result = {"spec": spec.name, "train_examples": train.num_rows, "test_examples": test.num_rows, "epochs": epochs,
              "base_batch": base_batch, "runs": runs,
              "largest_cowclip_minus_base_cowclip": _gap(largest, base),
              "largest_cowclip_relative_to_base": relative,
              "largest_cowclip_within_0.1_percent": relative is not None and relative >= -0.001,
              "cowclip_gain_at_largest": _gap(largest, by[(SCALES[-1], False)]),
              "largest_steps_per_epoch": largest["steps_per_epoch"], "quick": quick}
    print_table(f"{NAME}: test AUC (last 20 %, {test.num_rows:,} Examples) after {epochs} epoch(s) on "
                f"{train.num_rows:,} ({spec.name}); scaling rule in both arms",
                ["batch", "steps/epoch", "CowClip AUC", "plain AUC", "CowClip s", "plain s"],
                [[base_batch * s, by[(s, True)]["steps_per_epoch"], by[(s, True)]["test_auc"],
                  by[(s, False)]["test_auc"], f"{by[(s, True)]['train_seconds']:.1f}",
                  f"{by[(s, False)]['train_seconds']:.1f}"]
                 for s in SCALES])

    def plot(axes) -> None:
        for cowclip, label in ((True, "CowClip + scaling rule"), (False, "scaling rule only")):
            axes.plot([base_batch * s for s in SCALES], [by[(s, cowclip)]["test_auc"] for s in SCALES], marker="o",
                      label=label)
        axes.set_xscale("log", base=2)
        axes.set_xlabel("batch size")
        axes.set_ylabel("test AUC")
        axes.set_title(f"{NAME}: {spec.name}, {train.num_rows:,} training Examples")
        axes.legend(fontsize=8)

    return write_result(out, NAME, result, plot)


def _gap(a: dict, b: dict) -> float | None:
    return None if a["test_auc"] is None or b["test_auc"] is None else round(a["test_auc"] - b["test_auc"], 5)
