"""The Beam job: event logs -> join -> negative sampling -> features -> Examples (+ dead letters).

Each stage is a small composite transform around the pure logic of ``transforms/``:

* record level, the reference - ``JoinSampleExtract`` for any PCollection of ("impression" |
  "action", record): ``JoinImpressionsWithActions``, a stateful DoFn keyed by (request_id,
  item_id) that drives the per-key state machine ``transforms.join.KeyJoin`` with one event-time
  timer per key, then ``ToExamples`` (batches -> ``ExampleBuilder.build``). No command runs it:
  it is the plain per-record form of the join: ``tests/test_join.py`` holds the columnar join to
  ``KeyJoin``'s decisions, and ``tests/test_beam_join.py`` runs this DoFn on hand-driven watermarks;
* streaming in micro-batches (what ``streamrec join --streaming`` runs) - ``StreamingJoin``:
  (impressions table, actions table) batches split by join-key shard, the engine-free
  ``transforms.shard_join.ShardJoin`` held per shard in Beam state with one event-time timer;
* backfill - ``BackfillJoin``: log files -> Arrow tables split into join-key shards
  (``ReadLogTableShards``) -> a GroupByKey -> ``JoinShardDoFn``, the columnar join of
  ``transforms.batch_join`` in event-time micro-batches, then ``ExampleBuilder`` on columns.

Dead letters of every stage leave on the ``dead_letters`` output with their reason; a
``Metrics`` counter per reason counts them.
"""
from __future__ import annotations

import json
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
import pyarrow as pa

from schemas.events import arrow_schema
from schemas.logs import read_event_file, read_log_table
from schemas.spec import FeatureSpec
from transforms.batch_join import join_tables, split_batch_by_shard, split_by_shard
from transforms.examples import ExampleBuilder
from transforms.join import JoinConfig, Joined, KeyJoin, KeyState
from transforms.keys import join_key
from transforms.shard_join import EntryList, ShardJoin

DEAD = "dead_letters"
NAMESPACE = "streamrec"


def dead_letter_outputs(letters: Iterable[DeadLetter]):
    """Count each dead letter by stage and reason, and send it to the ``dead_letters`` output."""
    for letter in letters:
        Metrics.counter(NAMESPACE, f"dead_letters.{letter.stage}.{letter.reason}").inc()
        yield beam.pvalue.TaggedOutput(DEAD, letter)


def event_key(record: dict) -> str:
    """The join key: request id and item id (a string, so any runner can encode it)."""
    return join_key(record["request_id"], record["item_id"])


class JoinDoFn(beam.DoFn):
    """Per (request_id, item_id): the KeyJoin state machine with one event-time timer."""

    STATE = ReadModifyWriteStateSpec("join_state", PickleCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)

    def __init__(self, config: JoinConfig):
        self.config = config

    def setup(self):
        self.logic = KeyJoin(self.config)

    def _emit(self, outputs: Iterable):
        outputs = list(outputs)
        yield from (o for o in outputs if not isinstance(o, DeadLetter))
        yield from dead_letter_outputs(o for o in outputs if isinstance(o, DeadLetter))

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


class JoinImpressionsWithActions(beam.PTransform):
    """("impression" | "action", record) -> Joined, with dead letters on the side (streaming:
    a stateful DoFn per (request_id, item_id) with an event-time timer)."""

    def __init__(self, config: JoinConfig):
        super().__init__()
        self.config = config

    def expand(self, events):
        keyed = events | "KeyByRequestAndItem" >> beam.Map(lambda event: (event_key(event[1]), event)).with_output_types(
            beam.typehints.Tuple[str, beam.typehints.Any])
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
        yield from dead_letter_outputs(letters)
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
    """The whole first half of the streaming job: events -> Examples, all dead letters merged."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.spec = spec

    def expand(self, events):
        joined = events | "JoinImpressionsWithActions" >> JoinImpressionsWithActions(JoinConfig.from_spec(self.spec))
        examples = joined["joined"] | "ToExamples" >> ToExamples(self.spec)
        dead = (joined[DEAD], examples[DEAD]) | "MergeDeadLetters" >> beam.Flatten()
        return {"examples": examples["examples"], DEAD: dead}


class ReadLogTableShards(beam.DoFn):
    """A log file -> (shard, (kind, Arrow table)) per join-key shard; bad records -> dead letters."""

    def __init__(self, schema_name: str, kind: str, shards: int, time_range_ms: tuple[int, int]):
        self.schema_name, self.kind, self.shards, self.time_range_ms = schema_name, kind, shards, time_range_ms

    def setup(self):
        self.schema = load_schema(self.schema_name)

    def process(self, path: str):
        sink = DeadLetterSink(keep=None)
        for shard, part in split_by_shard(read_log_table(path, self.schema, sink, time_range_ms=self.time_range_ms),
                                           self.shards).items():
            yield shard, (self.kind, part)
        yield from dead_letter_outputs(sink.letters)


class JoinShardDoFn(beam.DoFn):
    """Backfill: all events of one shard, joined in event-time micro-batches (columnar), then
    sampled and feature-extracted; yields Example tables."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec

    def setup(self):
        self.builder = ExampleBuilder(self.spec)
        self.impression_schema = arrow_schema(load_schema(self.spec.events.impression))
        self.action_schema = arrow_schema(load_schema(self.spec.events.action))

    def process(self, element):
        _, parts = element
        impressions = pa.concat_tables([t for kind, t in parts if kind == "impression"] or
                                       [self.impression_schema.empty_table()])
        actions = pa.concat_tables([t for kind, t in parts if kind == "action"] or [self.action_schema.empty_table()])
        batches = join_tables(JoinConfig.from_spec(self.spec), impressions, actions)
        ordered = next(batches)
        for closed, letters in batches:
            table, feature_letters = self.builder.build_closed(ordered, closed)
            yield from dead_letter_outputs(letters + feature_letters)
            if table.num_rows:
                yield table


class SplitToShards(beam.DoFn):
    """(impressions table, actions table) -> (shard, (impressions, actions)) by join-key hash."""

    def __init__(self, shards: int):
        self.shards = shards

    def process(self, element):
        for shard, impressions, actions in split_batch_by_shard(*element, self.shards):
            yield shard, (impressions, actions)


class JoinShardStreamDoFn(beam.DoFn):
    """Streaming, in batches: per join-key shard, ``transforms.shard_join.ShardJoin`` with its
    state and open impressions (the tables themselves) in one Beam state value, and one
    event-time timer at its next due time."""

    STATE = ReadModifyWriteStateSpec("shard_join", PickleCoder())
    DUE = TimerSpec("due", TimeDomain.WATERMARK)

    def __init__(self, spec: FeatureSpec, emit_every_ms: int | None = None):
        self.spec, self.emit_every_ms = spec, emit_every_ms

    def setup(self):
        self.join = ShardJoin(self.spec, self.emit_every_ms, load=lambda table: table)

    def _save(self, state_cell, timer, state, open_impressions) -> None:
        state_cell.write((state, open_impressions))
        due = self.join.next_timer(state)
        if due is None:
            timer.clear()
        else:  # (on the DirectRunner a timer set behind the watermark waits for a round of its own)
            timer.set(Timestamp(micros=due * 1000))

    def process(self, element, state_cell=beam.DoFn.StateParam(STATE), timer=beam.DoFn.TimerParam(DUE)):
        _, (impressions, actions) = element
        state, open_impressions = state_cell.read() or (self.join.new_state(), EntryList())
        letters = self.join.add(state, open_impressions, impressions, impressions, actions)
        self._save(state_cell, timer, state, open_impressions)
        yield from dead_letter_outputs(letters)

    @on_timer(DUE)
    def due(self, fired_at=beam.DoFn.TimestampParam, state_cell=beam.DoFn.StateParam(STATE),
            timer=beam.DoFn.TimerParam(DUE)):
        if state_cell.read() is None:
            return
        state, open_impressions = state_cell.read()
        table, letters = self.join.close_to(state, open_impressions, fired_at.micros // 1000)
        yield from dead_letter_outputs(letters)
        if table is not None:
            yield table
        self._save(state_cell, timer, state, open_impressions)


class StreamingJoin(beam.PTransform):
    """Micro-batches (impressions table, actions table) -> Example tables, in shards, streaming."""

    def __init__(self, spec: FeatureSpec, shards: int = 4, emit_every_ms: int | None = None):
        super().__init__()
        self.spec, self.shards, self.emit_every_ms = spec, shards, emit_every_ms

    def expand(self, batches):
        joined = (batches | "SplitToShards" >> beam.ParDo(SplitToShards(self.shards))
                  | "JoinShards" >> beam.ParDo(JoinShardStreamDoFn(self.spec, self.emit_every_ms))
                  .with_outputs(DEAD, main="examples"))
        return {"examples": joined.examples, DEAD: joined[DEAD]}


class BackfillJoin(beam.PTransform):
    """Bounded logs -> Example tables, through the same join, sampling and features, in batches."""

    def __init__(self, spec: FeatureSpec, impression_files: list[str], action_files: list[str], shards: int = 8):
        super().__init__()
        self.spec, self.shards = spec, shards
        self.impression_files, self.action_files = impression_files, action_files

    def expand(self, pbegin):
        reads = []
        for kind, files, schema in (("impression", self.impression_files, self.spec.events.impression),
                                    ("action", self.action_files, self.spec.events.action)):
            reads.append(pbegin | f"List{kind}s" >> beam.Create(files)
                         | f"Read{kind}s" >> beam.ParDo(ReadLogTableShards(schema, kind, self.shards,
                                                                        self.spec.events.time_range_ms))
                         .with_outputs(DEAD, main="tables"))
        joined = ((reads[0].tables, reads[1].tables) | "MergeShards" >> beam.Flatten()
                  | "GroupByShard" >> beam.GroupByKey()
                  | "JoinSampleExtract" >> beam.ParDo(JoinShardDoFn(self.spec)).with_outputs(DEAD, main="examples"))
        dead = (reads[0][DEAD], reads[1][DEAD], joined[DEAD]) | "MergeDeadLetters" >> beam.Flatten()
        return {"examples": joined.examples, DEAD: dead}


def log_file_names(log_dir: str | Path) -> tuple[list[str], list[str]]:
    from schemas.logs import log_files

    return ([str(p) for p in log_files(log_dir, "impressions")], [str(p) for p in log_files(log_dir, "actions")])


class WriteBundles(beam.DoFn):
    """Writes each bundle's elements to one new file under ``directory`` (atomic rename).

    Works the same in batch and streaming (no windowed file sink needed): examples (records or
    Arrow tables) go to Parquet in the Example schema, dead letters and dicts (metric rows) to
    JSON lines.
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
            tables = [t for t in self.buffer if isinstance(t, pa.Table)]
            rows = [r for r in self.buffer if not isinstance(r, pa.Table)]
            table = pa.concat_tables(tables + ([pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)] if rows else []))
            with atomic_write(Path(self.directory) / f"{name}.parquet") as out:
                pq.write_table(table, out)
        else:
            with atomic_write(Path(self.directory) / f"{name}.jsonl", "w") as out:
                out.writelines((item.to_json() if hasattr(item, "to_json") else json.dumps(item)) + "\n"
                               for item in self.buffer)
        self.buffer = []


class LoadLogFile(beam.DoFn):
    """("impressions" | "actions", path) -> (impressions table, actions table) micro-batch."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec

    def setup(self):
        self.schemas = {"impressions": load_schema(self.spec.events.impression),
                        "actions": load_schema(self.spec.events.action)}

    def process(self, element):
        kind, path = element
        sink = DeadLetterSink(keep=None)
        yield read_event_file(path, kind, self.schemas, sink, self.spec.events.time_range_ms)
        yield from dead_letter_outputs(sink.letters)


class WatchLogDirectory(beam.PTransform):
    """Live input: new files under LOGS/impressions and LOGS/actions become micro-batches.

    Files are matched every ``interval_s`` seconds (``fileio.MatchContinuously``), so the
    watermark follows processing time: meant for live logs whose event times are near now (a
    replay of old logs belongs to ``streamrec backfill`` or ``join --streaming``). Writers must
    create files atomically (temporary name, then rename), as ``schemas.logs`` does.
    """

    def __init__(self, spec: FeatureSpec, log_dir: str, interval_s: float, stop_after_s: float | None):
        super().__init__()
        self.spec, self.log_dir, self.interval_s, self.stop_after_s = spec, log_dir, interval_s, stop_after_s

    def expand(self, pbegin):
        from apache_beam.io.fileio import MatchContinuously
        from apache_beam.utils.timestamp import MAX_TIMESTAMP

        start = Timestamp.now()
        stop = MAX_TIMESTAMP if self.stop_after_s is None else start + self.stop_after_s
        matched = []
        for kind in ("impressions", "actions"):
            for extension in ("avro", "parquet"):
                pattern = str(Path(self.log_dir) / kind / f"*.{extension}")
                matched.append(pbegin | f"Watch{kind}{extension}" >> MatchContinuously(
                    pattern, interval=self.interval_s, start_timestamp=start, stop_timestamp=stop)
                    | f"Tag{kind}{extension}" >> beam.Map(lambda meta, kind=kind: (kind, meta.path)))
        loaded = (matched | "NewFiles" >> beam.Flatten()
                  | "LoadFiles" >> beam.ParDo(LoadLogFile(self.spec)).with_outputs(DEAD, main="batches"))
        return {"batches": loaded.batches, DEAD: loaded[DEAD]}
