"""The trainer of one run, independent of the engine that feeds it (Beam's ``TrainExamples``,
Flink's ``TrainStream``): sorts Example tables into the trainer's total order (impression time,
request id, item id), trains full batches of ``training.batch_size``, publishes after each batch
and skips, after a resume, what the restored snapshot had trained.

The model, its tables and optimizer state live in the worker's memory, not in engine state: they
are the trainer's working set, recovered from the model directory's snapshots.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import pyarrow as pa

from schemas.spec_types import FeatureSpec


def log(message: str) -> None:
    """A line on stderr. (Not ``print``: PyFlink's process-mode workers replace it with one that
    takes no ``flush`` argument.)"""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


ORDER = [("impression_time_ms", "ascending"), ("request_id", "ascending"), ("item_id", "ascending")]


@dataclass(frozen=True)
class PublishOptions:
    """Where and how the trainer publishes (see ``trainer.publish``)."""

    model_dir: str
    clock: str = "event"  # "event" when replaying logs, "processing" when live
    resume: bool = False  # start from the newest snapshot and skip what it had trained


def after_position(examples: pa.Table, position) -> pa.Table:
    """Rows strictly after ``position`` in the trainer's order (time, request id, item id)."""
    import pyarrow.compute as pc

    time_ms = examples.column("impression_time_ms")
    same = pc.equal(time_ms, position.impression_time_ms)
    later_key = pc.or_(pc.greater(examples.column("request_id"), position.request_id),
                       pc.and_(pc.equal(examples.column("request_id"), position.request_id),
                               pc.greater(examples.column("item_id"), position.item_id)))
    return examples.filter(pc.or_(pc.greater(time_ms, position.impression_time_ms), pc.and_(same, later_key)))


class RunningTrainer:
    """One run's trainer with its publisher, progress bar and timing (lives in the worker)."""

    def __init__(self, spec: FeatureSpec, device: str, progress: bool, publishing: PublishOptions | None = None,
                 collectives=None):
        """``collectives`` (``trainer.sharded.Collectives``): this is one of ``training.workers``
        workers of a sharded trainer; every worker trains the same global batches of
        ``workers * batch_size`` examples."""
        from trainer.online import OnlineTrainer
        from trainer.publish import Position, Publisher, restore_trainer
        from trainer.report import Progress

        if collectives is not None:
            from trainer.sharded import ShardedTrainer

            self.trainer = ShardedTrainer(spec, collectives, device=device)
        else:
            self.trainer = OnlineTrainer(spec, device=device)
        self.position = Position()
        self.resumed_from = None
        self.resumed_at = None  # the restored snapshot's position: what it had trained
        self.out_of_order = 0  # examples that came after the trainer had trained past them
        self.publisher = None
        self.unscored_through = 0  # examples up to this count are trained but left out of the metrics
        if publishing is not None:
            if publishing.resume:
                self.position, entry = restore_trainer(self.trainer, publishing.model_dir)
                self.resumed_from, self.resumed_at = entry["version"], self.position
                log(f"resumed from snapshot version {entry['version']}: {self.position.examples} examples trained "
                    f"up to impression time {self.position.impression_time_ms}")
            self.publisher = Publisher(self.trainer, publishing.model_dir, clock=publishing.clock)
        self.stores = [group.table.store for group in self.trainer.groups
                       if group.table.store is not None and group.table.store.persistent]
        if self.resumed_at is not None and self.stores:
            # Rows written to the external store after the snapshot had learned the examples the
            # killed run trained past it: those are re-trained now, but scoring them again would
            # score examples the model has seen. They are left out of the metrics (and counted).
            learned = max(store.trained_mark() for store in self.stores)
            self.unscored_through = max(learned, self.position.examples)
            if learned > self.position.examples:
                log(f"the store's rows had learned up to example {learned}: examples {self.position.examples + 1}"
                    f"..{learned} are re-trained and left out of the metrics")
        else:  # a fresh run: no stored row has learned from this run yet (one worker says so for all)
            if collectives is None or collectives.rank == 0:
                for store in self.stores:
                    store.reset_trained_mark()
            if collectives is not None and self.stores:
                collectives.barrier()
        self._mark_stores()
        self.trained_this_run = 0
        self.excluded = 0  # examples re-trained after a resume and left out of the metrics
        self.workers = collectives.world if collectives is not None else 1
        self.batch_size = spec.training.batch_size * self.workers  # one global batch
        self.snapshot_taken = False  # whether the last train() published a snapshot
        self.snapshot_position = None  # the position of this run's newest snapshot
        self.progress = Progress() if progress else None
        self.seconds = 0.0

    def train(self, tables: list[pa.Table], flush: bool) -> tuple[pa.Table, list[dict]]:
        """Train full batches of ``tables`` in (impression time, request id, item id) order;
        returns the unused rest (everything is used when ``flush``) and the metric rows of
        windows now closed. Rows at or before the restored snapshot's position are skipped (it
        had trained them); rows behind what this run has trained already are trained all the
        same, and counted (``out_of_order_examples``: none when the input keeps its order)."""
        from trainer.publish import Position

        examples = pa.concat_tables(tables).sort_by(ORDER)
        if self.resumed_at is not None:
            examples = after_position(examples, self.resumed_at)
        self.out_of_order += examples.num_rows - after_position(examples, self.position).num_rows
        usable = examples.num_rows if flush else examples.num_rows // self.batch_size * self.batch_size
        started = time.perf_counter()
        self.snapshot_taken = False
        if usable:
            prepared = self.trainer.prepare(examples.slice(0, usable))
            times = prepared.times
            request_ids, item_ids = examples.column("request_id"), examples.column("item_id")
        for start in range(0, usable, self.batch_size):
            stop = min(start + self.batch_size, usable)
            unscored = min(max(self.unscored_through - self.position.examples, 0), stop - start)
            self.trainer.train_prepared(prepared, start, stop, unscored=unscored)
            self.excluded += unscored
            self.position = Position(int(times[stop - 1]), request_ids[stop - 1].as_py(), item_ids[stop - 1].as_py(),
                                     self.position.examples + stop - start)
            self.trained_this_run += stop - start
            self._mark_stores()
            if self.publisher is not None:
                entries = self.publisher.after_batch(self.position)
                if any(entry["kind"] == "snapshot" for entry in entries):
                    self.snapshot_taken, self.snapshot_position = True, self.position
            if self.progress is not None:
                self.progress.update(stop - start, self.trainer.metrics)
        self.seconds += time.perf_counter() - started
        return examples.slice(usable), self.trainer.closed_windows(flush=flush)

    def _mark_stores(self) -> None:
        """Rows written to a store from now on may have learned every example trained so far."""
        for store in self.stores:
            store.trained_examples = self.position.examples

    def finish(self) -> None:
        if self.publisher is not None:
            self.publisher.finish(self.position)  # its deltas write back to an external store
        else:
            self.trainer.write_back()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def summary(self) -> dict:
        summary = self.trainer.metrics.summary()
        summary["train_seconds"] = round(self.seconds, 2)
        summary["examples_trained"] = self.position.examples  # by this run and the snapshot it resumed from
        summary["examples_trained_this_run"] = self.trained_this_run
        summary["examples_per_s"] = round(self.trained_this_run / self.seconds) if self.trained_this_run else None
        summary["trainer_workers"] = self.workers
        summary["sequential_updates"] = self.trainer.sequential_updates
        summary["late_metric_examples"] = self.trainer.window_metrics.late_examples
        summary["out_of_order_examples"] = self.out_of_order
        tables = [group.table for group in self.trainer.groups]
        if any(table.store is not None for table in tables):  # the cache in front of the external store
            stats = {key: sum(table.stats[key] for table in tables) for key in ("lookups", "hits", "evicted", "fetched")}
            summary["cache"] = {"rows": sum(table.config.max_rows for table in tables),
                                "hit_rate": round(stats["hits"] / max(stats["lookups"], 1), 4), **stats}
        if self.publisher is not None:
            summary["model_version"] = self.publisher.version
            summary["resumed_from_version"] = self.resumed_from
        if self.resumed_at is not None:
            summary["resume_metrics"] = "excluding re-trained" if self.excluded else "exact"
            summary["metrics_excluded_examples"] = self.excluded
        return summary
