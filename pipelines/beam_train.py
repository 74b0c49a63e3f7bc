"""The trainer as a stateful Beam transform after feature extraction: Example tables in,
progressive-metric rows per event-time window and a final summary out.

``TrainExamples`` keys every Example table to one trainer key (one model, as one Monolith
training worker) and holds the tables in Beam state until the watermark passes them, so the
trainer sees them in event-time order:

* streaming - an event-time timer at the earliest buffered table's timestamp trains, in
  impression-time order and in batches of ``training.batch_size``, every buffered table the
  watermark has passed; fewer than a batch's examples wait for the next firing;
* every trained batch may publish (``PublishOptions``: sparse deltas, dense weights, snapshots to a
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

import uuid

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from schemas.spec_types import FeatureSpec
from trainer.running import PublishOptions, RunningTrainer, log

SUMMARY = "summary"
_TRAINERS: dict[str, "RunningTrainer"] = {}


class TrainDoFn(beam.DoFn):
    BUFFER = BagStateSpec("buffer", PickleCoder())  # (timestamp micros, Example table)
    DUE_AT = ReadModifyWriteStateSpec("due_at", PickleCoder())  # micros of the DUE timer, if set
    DUE = TimerSpec("due", TimeDomain.WATERMARK)
    END = TimerSpec("end", TimeDomain.WATERMARK)

    def __init__(self, spec: FeatureSpec, device: str, at_end: bool, progress: bool, run_id: str,
                 publishing: PublishOptions | None):
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
        log(f"trained {summary['examples']} examples: {summary}")
        yield beam.pvalue.TaggedOutput(SUMMARY, summary)


def release_trainers() -> None:
    """Drop the trainers of finished runs in this process."""
    for running in _TRAINERS.values():
        running.close()
    _TRAINERS.clear()


class TrainExamples(beam.PTransform):
    """Example tables -> {"metrics": rows per event-time window, "summary": one final dict}."""

    def __init__(self, spec: FeatureSpec, device: str = "cpu", at_end: bool = False, progress: bool = True,
                 publishing: PublishOptions | None = None):
        super().__init__()
        self.spec, self.device, self.at_end, self.progress = spec, device, at_end, progress
        self.publishing = publishing

    def expand(self, examples):
        trained = (examples | "OneTrainer" >> beam.Map(lambda table: (0, table))
                   | "Train" >> beam.ParDo(TrainDoFn(self.spec, self.device, self.at_end, self.progress,
                                                     uuid.uuid4().hex, self.publishing)).with_outputs(SUMMARY, main="metrics"))
        return {"metrics": trained.metrics, SUMMARY: trained[SUMMARY]}
