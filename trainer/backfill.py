"""Batch training on history before a model goes online: phase 1 of ``streamrec run
--backfill-until TIME`` (Monolith trains in batch on historical data, then online on the stream).

Phase 1 trains the Examples whose impression time is before ``until_ms`` in the trainer's total
order at ``scale`` x the spec's batch, with CowClip's per-id clipping and its scaling rule
(``large_batch_spec``), for ``epochs`` passes. The online trainer of the spec's own settings then
takes over its tables, optimizer state and dense weights (``OnlineTrainer.continue_from``) and
publishes them as a snapshot to the model directory: the job resumes from it (phase 2) and
trains, online, only what comes after the snapshot's position.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from schemas.spec_types import FeatureSpec

CRITEO_EMBEDDING_L2 = 1e-5  # CowClip's base embedding L2 (Criteo, batch 1K), where a slot names none


def large_batch_spec(spec: FeatureSpec, batch_size: int, cowclip: bool = True, base_batch: int | None = None) -> FeatureSpec:
    """``spec`` for training at ``batch_size = s * base_batch`` (default base: the spec's batch)
    by CowClip's scaling rule (``trainer.cowclip.scale_hyperparameters``): every slot's embedding
    lr kept and its L2 x s (a slot without L2 starts from CowClip's 1e-5), dense lr x sqrt(s),
    warm-up; CowClip's per-id clipping on or off. Slots that shared an optimizer still do."""
    from trainer.cowclip import Hyperparameters, scale_hyperparameters

    base_batch = base_batch or spec.training.batch_size
    scale = batch_size / base_batch
    dense = spec.training.dense_optimizer
    rule = scale_hyperparameters(Hyperparameters(base_batch, 0.0, 1.0, dense.lr, spec.training.warmup_steps), batch_size)
    slots = tuple(dataclasses.replace(slot, optimizer=dataclasses.replace(
        slot.optimizer, l2=(slot.optimizer.l2 or CRITEO_EMBEDDING_L2) * scale)) for slot in spec.slots)
    training = dataclasses.replace(spec.training, batch_size=batch_size, warmup_steps=rule.warmup_steps,
                                   dense_optimizer=dataclasses.replace(dense, lr=rule.dense_lr),
                                   cowclip=dataclasses.replace(spec.training.cowclip, enabled=cowclip))
    return dataclasses.replace(spec, slots=slots, training=training)


@dataclass(frozen=True)
class BackfillOptions:
    """Phase 1 of a job: batch training on the Examples before ``until_ms``."""

    until_ms: int  # Examples with impression time < until_ms (ms since the epoch) are history
    epochs: int = 2  # passes over the history
    scale: int = 16  # the batch is scale x the spec's training.batch_size

    def __post_init__(self):
        if not 1 <= self.epochs <= 100:
            raise ValueError(f"--backfill-epochs must be in [1, 100], got {self.epochs}")
        if not 1 <= self.scale <= 1024:
            raise ValueError(f"--backfill-scale must be in [1, 1024], got {self.scale}")


def history_before(examples: pa.Table, until_ms: int) -> pa.Table:
    """The Examples with impression time before ``until_ms``, in the trainer's order."""
    import pyarrow.compute as pc

    from trainer.running import ORDER

    return examples.filter(pc.less(examples.column("impression_time_ms"), until_ms)).sort_by(ORDER)


def backfill_model(spec: FeatureSpec, examples: pa.Table, model_dir: str | Path, options: BackfillOptions,
                   device: str = "cpu") -> dict:
    """Phase 1 on ``examples``' history: train it in batch, hand the model to the spec's online
    trainer and publish that as a snapshot (version 1) of the empty ``model_dir``; returns the
    figures (``examples``: history trained, ``position``: the last of them)."""
    from trainer.online import OnlineTrainer
    from trainer.publish import Position, Publisher, read_manifest

    if read_manifest(Path(model_dir)):
        raise ValueError(f"{model_dir}: --backfill-until starts a new model, but this model directory has versions "
                         f"(give another --model-dir, or --resume it without --backfill-until)")
    history = history_before(examples, options.until_ms)
    if history.num_rows == 0:
        first = min(examples.column("impression_time_ms").to_pylist(), default=None)
        raise ValueError(f"--backfill-until {options.until_ms}: no Example is before it (the first impression is "
                         f"at {first} ms)")
    batch_spec = large_batch_spec(spec, spec.training.batch_size * options.scale, cowclip=True)
    started = time.perf_counter()
    batch = OnlineTrainer(batch_spec, device=device)
    for _ in range(options.epochs):
        batch.train(history)
    online = OnlineTrainer(spec, device=device)
    online.continue_from(batch)
    last = history.slice(history.num_rows - 1).to_pylist()[0]
    position = Position(int(last["impression_time_ms"]), last["request_id"], last["item_id"], history.num_rows)
    entry = Publisher(online, model_dir).publish_snapshot(position)
    return {"until_ms": options.until_ms, "examples": history.num_rows, "epochs": options.epochs,
            "batch_size": batch_spec.training.batch_size, "cowclip": True,
            "dense_lr": batch_spec.training.dense_optimizer.lr, "warmup_steps": batch_spec.training.warmup_steps,
            "snapshot_version": entry["version"], "position": dataclasses.asdict(position),
            "seconds": round(time.perf_counter() - started, 2)}
