"""The trainer as a stateful Beam transform after feature extraction: Example tables in,
progressive-metric rows per event-time window and a final summary out.

``TrainExamples`` keys every Example table to one trainer key (one model, as one Monolith
training worker) and holds the tables in Beam state until the watermark passes them, so the
trainer sees them in event-time order:

* streaming - an event-time timer at the earliest buffered table's timestamp trains, in
  impression-time order and in batches of ``training.batch_size``, every buffered table the
  watermark has passed; fewer than a batch's examples wait for the next firing;
* every trained batch may publish (``Publishing``: sparse deltas, dense weights, snapshots to a
  model directory on the job's clock); ``resume`` restores the newest snapshot and skips the
  examples it had trained (the order is total: impression time, request id, item id);
* backfill (``at_end``) - everything is buffered and trained, in impression-time order, when the
  input is complete;
* at the end of the input (the global window's last timer) the rest is trained, the open
  metric windows are closed and the summary is emitted. On the DirectRunner an upstream timer
  set behind the watermark can still emit after that timer fired: such tables are trained
  when they arrive and a new summary follows (the one with the most examples is the last).

The model, its tables and optimizer state live in the worker's memory, not in Beam state (they
are the trainer's working set, recovered from snapshots); a process-wide registry keyed by the
run's id gives every DoFn instance of the run the same trainer.
"""
from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from schemas.spec import FeatureSpec

SUMMARY = "summary"
_TRAINERS: dict[str, "RunningTrainer"] = {}


ORDER = [("impression_time_ms", "ascending"), ("request_id", "ascending"), ("item_id", "ascending")]


@dataclass(frozen=True)
class Publishing:
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

    def __init__(self, spec: FeatureSpec, device: str, progress: bool, publishing: Publishing | None = None):
        from trainer.online import OnlineTrainer
        from trainer.publish import Position, Publisher, restore_trainer
        from trainer.report import Progress

        self.trainer = OnlineTrainer(spec, device=device)
        self.position = Position()
        self.resumed_from = None
        self.publisher = None
        if publishing is not None:
            if publishing.resume:
                self.position, entry = restore_trainer(self.trainer, publishing.model_dir)
                self.resumed_from = entry["version"]
                print(f"resumed from snapshot version {entry['version']}: {self.position.examples} examples trained "
                      f"up to impression time {self.position.impression_time_ms}", file=sys.stderr, flush=True)
            self.publisher = Publisher(self.trainer, publishing.model_dir, clock=publishing.clock)
        self.batch_size = spec.training.batch_size
        self.progress = Progress() if progress else None
        self.seconds = 0.0

    def train(self, tables: list[pa.Table], flush: bool) -> tuple[pa.Table, list[dict]]:
        """Train full batches of ``tables`` in (impression time, request id, item id) order;
        returns the unused rest (everything is used when ``flush``) and the metric rows of
        windows now closed. Rows at or before the resume position are skipped."""
        from trainer.publish import Position

        examples = pa.concat_tables(tables).sort_by(ORDER)
        if self.resumed_from is not None:
            examples = after_position(examples, self.position)
        usable = examples.num_rows if flush else examples.num_rows // self.batch_size * self.batch_size
        started = time.perf_counter()
        for start in range(0, usable, self.batch_size):
            batch = examples.slice(start, min(self.batch_size, usable - start))
            self.trainer.train_batch(batch)
            last = batch.slice(batch.num_rows - 1).to_pylist()[0]
            self.position = Position(last["impression_time_ms"], last["request_id"], last["item_id"],
                                     self.position.examples + batch.num_rows)
            if self.publisher is not None:
                self.publisher.after_batch(self.position)
            if self.progress is not None:
                self.progress.update(batch.num_rows, self.trainer.metrics.auc)
        self.seconds += time.perf_counter() - started
        return examples.slice(usable), self.trainer.closed_windows(flush=flush)

    def finish(self) -> None:
        if self.publisher is not None:
            self.publisher.finish(self.position)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def summary(self) -> dict:
        summary = self.trainer.metrics.summary()
        summary["train_seconds"] = round(self.seconds, 2)
        summary["examples_per_s"] = round(summary["examples"] / max(self.seconds, 1e-9))
        summary["late_metric_examples"] = self.trainer.window_metrics.late_examples
        if self.publisher is not None:
            summary["model_version"] = self.publisher.version
            summary["resumed_from_version"] = self.resumed_from
        return summary


class TrainDoFn(beam.DoFn):
    BUFFER = BagStateSpec("buffer", PickleCoder())  # (timestamp micros, Example table)
    DUE_AT = ReadModifyWriteStateSpec("due_at", PickleCoder())  # micros of the DUE timer, if set
    DUE = TimerSpec("due", TimeDomain.WATERMARK)
    END = TimerSpec("end", TimeDomain.WATERMARK)

    def __init__(self, spec: FeatureSpec, device: str, at_end: bool, progress: bool, run_id: str,
                 publishing: Publishing | None):
        self.spec, self.device, self.at_end, self.progress, self.run_id = spec, device, at_end, progress, run_id
        self.publishing = publishing

    def _trainer(self) -> RunningTrainer:
        if self.run_id not in _TRAINERS:
            _TRAINERS[self.run_id] = RunningTrainer(self.spec, self.device, self.progress, self.publishing)
        return _TRAINERS[self.run_id]

    def process(self, element, timestamp=beam.DoFn.TimestampParam, buffer=beam.DoFn.StateParam(BUFFER),
                due_at=beam.DoFn.StateParam(DUE_AT), due=beam.DoFn.TimerParam(DUE), end=beam.DoFn.TimerParam(END)):
        _, table = element
        if table.num_rows == 0:
            return []
        buffer.add((timestamp.micros, table))
        end.set(GlobalWindow().max_timestamp())
        if not self.at_end:
            current = due_at.read()
            if current is None or timestamp.micros < current:
                due.set(Timestamp(micros=timestamp.micros))
                due_at.write(timestamp.micros)
        return []

    @on_timer(DUE)
    def train_due(self, fired_at=beam.DoFn.TimestampParam, buffer=beam.DoFn.StateParam(BUFFER),
                  due_at=beam.DoFn.StateParam(DUE_AT), due=beam.DoFn.TimerParam(DUE)):
        entries = list(buffer.read())
        ready = [table for micros, table in entries if micros <= fired_at.micros]
        waiting = [(micros, table) for micros, table in entries if micros > fired_at.micros]
        rest, rows = self._trainer().train(ready, flush=False) if ready else (None, [])
        buffer.clear()
        if rest is not None and rest.num_rows:
            waiting.append((fired_at.micros, rest))
        for entry in waiting:
            buffer.add(entry)
        later = [micros for micros, _ in waiting if micros > fired_at.micros]
        if later:
            due.set(Timestamp(micros=min(later)))
            due_at.write(min(later))
        else:
            due_at.clear()
        yield from rows

    @on_timer(END)
    def train_rest(self, buffer=beam.DoFn.StateParam(BUFFER), due_at=beam.DoFn.StateParam(DUE_AT)):
        tables = [table for _, table in buffer.read()]
        buffer.clear()
        due_at.clear()
        trainer = self._trainer()
        _, rows = trainer.train(tables, flush=True) if tables else (None, trainer.trainer.closed_windows(flush=True))
        yield from rows
        trainer.finish()
        summary = trainer.summary()
        print(f"trained {summary['examples']} examples: {summary}", file=sys.stderr, flush=True)
        yield beam.pvalue.TaggedOutput(SUMMARY, summary)


def release_trainers() -> None:
    """Drop the trainers of finished runs in this process."""
    for running in _TRAINERS.values():
        running.close()
    _TRAINERS.clear()


class TrainExamples(beam.PTransform):
    """Example tables -> {"metrics": rows per event-time window, "summary": one final dict}."""

    def __init__(self, spec: FeatureSpec, device: str = "cpu", at_end: bool = False, progress: bool = True,
                 publishing: Publishing | None = None):
        super().__init__()
        self.spec, self.device, self.at_end, self.progress = spec, device, at_end, progress
        self.publishing = publishing

    def expand(self, examples):
        trained = (examples | "OneTrainer" >> beam.Map(lambda table: (0, table))
                   | "Train" >> beam.ParDo(TrainDoFn(self.spec, self.device, self.at_end, self.progress,
                                                     uuid.uuid4().hex, self.publishing)).with_outputs(SUMMARY, main="metrics"))
        return {"metrics": trained.metrics, SUMMARY: trained[SUMMARY]}
