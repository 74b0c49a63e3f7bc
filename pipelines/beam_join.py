"""The Beam job: event logs -> join -> negative sampling -> features -> Examples (+ dead letters).

Each stage is a small composite transform around the pure logic of ``transforms/``:

* ``ReadEventLogs``: log files -> records stamped with their event time (bad records -> dead letters);
* ``JoinImpressionsWithActions``: a stateful DoFn keyed by (request_id, item_id) that drives
  ``transforms.join.KeyJoin`` with one event-time timer per key and clears its state when done;
* ``ToExamples``: batches of joined impressions -> ``transforms.examples.ExampleBuilder``.

Dead letters of every stage leave on the ``dead_letters`` output with their reason; a
``Metrics`` counter per reason counts them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from schemas.dead_letters import DeadLetter, DeadLetterSink
from schemas.events import load_schema
from schemas.logs import read_log_file
from schemas.spec import FeatureSpec
from transforms.examples import ExampleBuilder
from transforms.join import JoinConfig, Joined, KeyJoin, KeyState, join_key_events

DEAD = "dead_letters"
NAMESPACE = "streamrec"


def _count_dead(letter: DeadLetter) -> None:
    Metrics.counter(NAMESPACE, f"dead_letters.{letter.stage}.{letter.reason}").inc()


def event_key(record: dict) -> str:
    """The join key: request id and item id (a string, so any runner can encode it)."""
    return f"{record['request_id']}\x1f{record['item_id']}"


class ReadLogFile(beam.DoFn):
    """A log file path -> its records, timestamped by event time; bad records -> dead letters."""

    def __init__(self, schema_name: str, kind: str):
        self.schema_name, self.kind = schema_name, kind

    def setup(self):
        self.schema = load_schema(self.schema_name)

    def process(self, path: str):
        sink = DeadLetterSink(keep=None)
        for record in read_log_file(path, self.schema, sink):
            yield beam.window.TimestampedValue((self.kind, record), Timestamp(micros=record["event_time_ms"] * 1000))
        for letter in sink.letters:
            _count_dead(letter)
            yield beam.pvalue.TaggedOutput(DEAD, letter)


class ReadEventLogs(beam.PTransform):
    """Impression and action log files -> ("impression" | "action", record), event-time stamped."""

    def __init__(self, spec: FeatureSpec, impression_files: list[str], action_files: list[str]):
        super().__init__()
        self.spec, self.impression_files, self.action_files = spec, impression_files, action_files

    def expand(self, pbegin):
        impressions = (pbegin | "ImpressionFiles" >> beam.Create(self.impression_files)
                       | "ReadImpressions" >> beam.ParDo(ReadLogFile(self.spec.events.impression, "impression"))
                       .with_outputs(DEAD, main="events"))
        actions = (pbegin | "ActionFiles" >> beam.Create(self.action_files)
                   | "ReadActions" >> beam.ParDo(ReadLogFile(self.spec.events.action, "action"))
                   .with_outputs(DEAD, main="events"))
        events = (impressions.events, actions.events) | "MergeEvents" >> beam.Flatten()
        dead = (impressions[DEAD], actions[DEAD]) | "MergeReadDeadLetters" >> beam.Flatten()
        return {"events": events, DEAD: dead}


class JoinDoFn(beam.DoFn):
    """Per (request_id, item_id): the KeyJoin state machine with one event-time timer."""

    STATE = ReadModifyWriteStateSpec("join_state", PickleCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)

    def __init__(self, config: JoinConfig):
        self.config = config

    def setup(self):
        self.logic = KeyJoin(self.config)

    def _emit(self, outputs: Iterable):
        for output in outputs:
            if isinstance(output, DeadLetter):
                _count_dead(output)
                yield beam.pvalue.TaggedOutput(DEAD, output)
            else:
                yield output

    def _store(self, state_cell, timer, state: KeyState | None):
        due = self.logic.next_timer(state) if state is not None else None
        if due is None:
            state_cell.clear()
            timer.clear()
        else:
            state_cell.write(state)
            timer.set(Timestamp(micros=due * 1000))

    def process(self, element, state_cell=beam.DoFn.StateParam(STATE), timer=beam.DoFn.TimerParam(CLOSE)):
        _, (kind, record) = element
        state = state_cell.read() or KeyState()
        if kind == "impression":
            outputs = self.logic.on_impression(state, record["event_time_ms"], record)
        else:
            outputs = self.logic.on_action(state, record["action_type"], record["event_time_ms"], record)
        self._store(state_cell, timer, None if state.empty and not state.closed else state)
        yield from self._emit(outputs)

    @on_timer(CLOSE)
    def close(self, fired_at=beam.DoFn.TimestampParam, state_cell=beam.DoFn.StateParam(STATE),
              timer=beam.DoFn.TimerParam(CLOSE)):
        state = state_cell.read()
        if state is None:
            return
        outputs, drop = self.logic.on_timer(state, fired_at.micros // 1000)
        self._store(state_cell, timer, None if drop else state)
        yield from self._emit(outputs)


class JoinGroupedDoFn(JoinDoFn):
    """Backfill: one key's events at once (after a GroupByKey), through the same KeyJoin."""

    def process(self, element):
        _, events = element
        flat = [(kind, record.get("action_type"), record["event_time_ms"], record) for kind, record in events]
        yield from self._emit(join_key_events(self.config, flat))


class JoinImpressionsWithActions(beam.PTransform):
    """("impression" | "action", record) -> Joined, with dead letters on the side.

    Streaming: a stateful DoFn with event-time timers. Backfill (``batch=True``): a GroupByKey
    and the same per-key logic, which is much faster on a bounded input.
    """

    def __init__(self, config: JoinConfig, batch: bool = False):
        super().__init__()
        self.config, self.batch = config, batch

    def expand(self, events):
        keyed = events | "KeyByRequestAndItem" >> beam.Map(lambda event: (event_key(event[1]), event)).with_output_types(
            beam.typehints.Tuple[str, beam.typehints.Any])
        if self.batch:
            joined = (keyed | "GroupByKey" >> beam.GroupByKey()
                      | "Join" >> beam.ParDo(JoinGroupedDoFn(self.config)).with_outputs(DEAD, main="joined"))
        else:
            joined = keyed | "Join" >> beam.ParDo(JoinDoFn(self.config)).with_outputs(DEAD, main="joined")
        return {"joined": joined.joined, DEAD: joined[DEAD]}


class BuildExamples(beam.DoFn):
    """A batch of Joined -> Example records (dicts in the Example schema) and feature dead letters."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec

    def setup(self):
        self.builder = ExampleBuilder(self.spec)

    def process(self, batch: list[Joined]):
        table, letters = self.builder.build(batch)
        for letter in letters:
            _count_dead(letter)
            yield beam.pvalue.TaggedOutput(DEAD, letter)
        yield from table.to_pylist()


class ToExamples(beam.PTransform):
    def __init__(self, spec: FeatureSpec, max_batch_size: int = 4096):
        super().__init__()
        self.spec, self.max_batch_size = spec, max_batch_size

    def expand(self, joined):
        examples = (joined
                    | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.max_batch_size)
                    | "SampleAndExtract" >> beam.ParDo(BuildExamples(self.spec)).with_outputs(DEAD, main="examples"))
        return {"examples": examples.examples, DEAD: examples[DEAD]}


class JoinSampleExtract(beam.PTransform):
    """The whole first half of the job: events -> Examples, all dead letters merged."""

    def __init__(self, spec: FeatureSpec, batch: bool = False):
        super().__init__()
        self.spec, self.batch = spec, batch

    def expand(self, events):
        joined = events | "JoinImpressionsWithActions" >> JoinImpressionsWithActions(
            JoinConfig.from_spec(self.spec), batch=self.batch)
        examples = joined["joined"] | "ToExamples" >> ToExamples(self.spec)
        dead = (joined[DEAD], examples[DEAD]) | "MergeDeadLetters" >> beam.Flatten()
        return {"examples": examples["examples"], DEAD: dead}


def log_file_names(log_dir: str | Path) -> tuple[list[str], list[str]]:
    from schemas.logs import log_files

    return ([str(p) for p in log_files(log_dir, "impressions")], [str(p) for p in log_files(log_dir, "actions")])


class WriteBundles(beam.DoFn):
    """Writes each bundle's elements to one new file under ``directory`` (atomic rename).

    Works the same in batch and streaming (no windowed file sink needed): examples go to
    Parquet in the Example schema, dead letters to JSON lines.
    """

    def __init__(self, directory: str, kind: str):
        self.directory, self.kind = directory, kind

    def start_bundle(self):
        self.buffer = []

    def process(self, element):
        self.buffer.append(element)
        return []

    def finish_bundle(self):
        if not self.buffer:
            return
        import uuid

        import pyarrow as pa
        import pyarrow.parquet as pq

        from schemas.logs import atomic_write
        from transforms.examples import EXAMPLE_SCHEMA

        name = f"part-{uuid.uuid4().hex}"
        if self.kind == "examples":
            table = pa.Table.from_pylist(self.buffer, schema=EXAMPLE_SCHEMA)
            with atomic_write(Path(self.directory) / f"{name}.parquet") as out:
                pq.write_table(table, out)
        else:
            with atomic_write(Path(self.directory) / f"{name}.jsonl", "w") as out:
                out.writelines(letter.to_json() + "\n" for letter in self.buffer)
        self.buffer = []
