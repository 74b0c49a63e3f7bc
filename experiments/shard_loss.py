"""``shard-loss``: a lost parameter-server shard, restored from a snapshot of some age.

Monolith trades reliability for freshness: parameter servers are snapshotted daily, and a lost
shard comes back from the last snapshot; its claim is that the quality lost is not visible.

The spec's online trainer trains up to the loss time ``T`` (by default 8/9 of the event-time
span), writing the tables' snapshots (``trainer.table_snapshot.save_table``) at ``T - D`` for D
in {1 h, 1 d, 7 d} on the way and the whole training state at ``T`` (a model-directory snapshot,
``trainer.publish``). Each arm restores that state (``restore_trainer``), drops the rows of one
of ``shards`` shards (the fids ``trainer.hashing.owner_of`` assigns to it: 1/N of the ids, as a
sharded trainer places them), puts back that shard's rows from the snapshot taken D before T
(rows with their optimizer state; D = 0: nothing lost; "never": no snapshot, the ids start
again from fresh rows) and trains on after T online, scoring each Example before learning it.

Reported per D, against the run without loss, on the Examples after T: the AUC, the dip (the
AUC of the first window after T below the no-loss run's) and the recovery time (from T to the
end of the first window after which every window stays within ``tolerance`` AUC of the
no-loss run's; None: not within the logs).
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
    trained_progressively,
    write_result,
)
from schemas.spec_types import FeatureSpec

NAME = "shard-loss"
SNAPSHOT_AGES_MS = (0, HOUR_MS, DAY_MS, 7 * DAY_MS, None)  # None: never snapshotted (fresh rows)


def run(spec: FeatureSpec, examples: pa.Table, out: Path, quick: bool = False, device: str = "cpu",
        shards: int = 4, lost_shard: int = 0, loss_at_fraction: float = 8 / 9, tolerance: float = 0.005,
        ages_ms: tuple = SNAPSHOT_AGES_MS) -> dict:
    from trainer.online import OnlineTrainer
    from trainer.publish import Position, Publisher, restore_trainer
    from trainer.table_snapshot import save_table

    if not 0 <= lost_shard < shards:
        raise ValueError(f"lost_shard must be in [0, {shards}), got {lost_shard}")
    times = event_times(examples)
    start, end = int(times.min()), int(times.max())
    loss_ms = int(start + loss_at_fraction * (end - start))
    cut = int(np.searchsorted(times, loss_ms, side="left"))
    after = examples.slice(cut)
    if cut == 0 or after.num_rows == 0:
        raise ValueError(f"the loss at {loss_at_fraction:.0%} of the span leaves nothing before or after it")
    work = out / "shard-loss-work"
    shutil.rmtree(work, ignore_errors=True)

    # Train up to T, snapshotting the tables at T - D on the way, and the whole state at T.
    trainer = OnlineTrainer(spec, device=device)
    snapshot_at = sorted({loss_ms - age for age in ages_ms if age and loss_ms - age >= start})
    snapshot_dirs, done = {}, 0
    for at in snapshot_at + [loss_ms]:
        upto = int(np.searchsorted(times, at, side="left"))
        if upto > done:
            trainer.train(examples.slice(done, upto - done))
            done = upto
        if at < loss_ms:
            snapshot_dirs[loss_ms - at] = saved = work / f"tables-{duration(loss_ms - at)}-before"
            saved.mkdir(parents=True)
            for index, group in enumerate(trainer.groups):
                save_table(group.table, saved / f"table-{index}.arrow")
    Publisher(trainer, work / "model").publish_snapshot(Position())

    labels, weights = labels_and_weights(spec, after)
    window_ms = max(HOUR_MS, (end - loss_ms) // 12)
    window = (event_times(after) - loss_ms) // window_ms
    arms, curves = [], {}
    for age in ages_ms:
        if age and age not in snapshot_dirs:
            arms.append({"snapshot_age": duration(age), "snapshot_age_ms": age, "available": False})
            continue
        arm = OnlineTrainer(spec, device=device)
        restore_trainer(arm, work / "model")
        lost = restored = 0
        if age != 0:
            lost, restored = _lose_shard(arm, shards, lost_shard, None if age is None else snapshot_dirs[age])
        scores = trained_progressively(arm, after)
        curves[age] = [evaluate(scores, labels, weights, window == w)["auc"] for w in range(int(window.max()) + 1)]
        arms.append({"snapshot_age": duration(age) if age else ("none lost" if age == 0 else "never"),
                     "snapshot_age_ms": age, "available": True, "rows_lost": lost, "rows_restored": restored,
                     **{f"after_{key}": value for key, value in evaluate(scores, labels, weights).items()}})
    baseline = curves[0]
    for arm in arms:
        if not arm["available"] or arm["snapshot_age_ms"] == 0:
            continue
        gaps = [None if a is None or b is None else b - a for a, b in zip(curves[arm["snapshot_age_ms"]], baseline)]
        arm["first_window_dip"] = None if gaps[0] is None else round(gaps[0], 5)
        arm["after_auc_dip"] = round(arms[0]["after_auc"] - arm["after_auc"], 5)
        arm["recovery_ms"] = _recovery_ms(gaps, tolerance, window_ms, (end - loss_ms))
        arm["recovery"] = "not within the logs" if arm["recovery_ms"] is None else duration(arm["recovery_ms"])
    shutil.rmtree(work)
    result = {"spec": spec.name, "examples": examples.num_rows, "after_examples": after.num_rows,
              "loss_at": duration(loss_ms - start) + " after the start", "after_span": duration(end - loss_ms),
              "shards": shards, "lost_shard": lost_shard, "window": duration(window_ms), "tolerance": tolerance,
              "arms": arms, "window_auc": {arm["snapshot_age"]: curves[arm["snapshot_age_ms"]] for arm in arms
                                           if arm["available"]}, "quick": quick}
    print_table(f"{NAME}: shard {lost_shard} of {shards} lost at T ({result['loss_at']}); AUC on the "
                f"{after.num_rows:,} Examples after T ({result['after_span']}), windows of {result['window']}",
                ["restored from", "rows lost", "AUC after T", "dip (all)", "dip (1st window)", "recovery"],
                [[a["snapshot_age"], a.get("rows_lost"), a.get("after_auc"), a.get("after_auc_dip"),
                  a.get("first_window_dip"), a.get("recovery", "-" if a["available"] else "no snapshot that old")]
                 for a in arms])

    def plot(axes) -> None:
        for arm in arms:
            if arm["available"] and arm["snapshot_age_ms"] != 0:
                curve = curves[arm["snapshot_age_ms"]]
                axes.plot([(w + 1) * window_ms / HOUR_MS for w in range(len(curve))],
                          [np.nan if a is None or b is None else a - b for a, b in zip(curve, baseline)],
                          marker=".", label=f"restored from {arm['snapshot_age']}")
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.set_xlabel("hours after the loss (window end)")
        axes.set_ylabel("window AUC minus the run without loss")
        axes.set_title(f"{NAME}: {spec.name}, shard {lost_shard} of {shards}")
        axes.legend(fontsize=8)

    return write_result(out, NAME, result, plot)


def _lose_shard(trainer, shards: int, lost_shard: int, snapshot_dir: Path | None) -> tuple[int, int]:
    """Drop the rows of ``lost_shard`` from every table, then put back that shard's rows from
    the table snapshots in ``snapshot_dir`` (None: none); returns (rows lost, rows restored)."""
    from trainer.hashing import owner_of
    from trainer.table_snapshot import read_rows

    lost = restored = 0
    for index, group in enumerate(trainer.groups):
        fids = group.table.all_rows().fids
        lost += group.table.delete(fids[owner_of(fids, shards) == lost_shard])
        if snapshot_dir is not None:
            rows, _, _ = read_rows(snapshot_dir / f"table-{index}.arrow")
            rows = rows.select(owner_of(rows.fids, shards) == lost_shard)
            group.table.put_rows(rows)
            restored += len(rows)
    return lost, restored


def _recovery_ms(gaps: list, tolerance: float, window_ms: int, span_ms: int) -> int | None:
    """From the loss to the end of the first window after which every gap is within tolerance."""
    for first in range(len(gaps)):
        if all(gap is None or abs(gap) <= tolerance for gap in gaps[first:]):
            return min(first * window_ms, span_ms)
    return None
