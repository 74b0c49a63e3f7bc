"""The Beam job's join: event logs -> join -> negative sampling -> features -> Example tables.

Both forms are small composite transforms around the engine-free logic of ``transforms/``:

* streaming in micro-batches (what ``streamrec join --streaming`` and ``run`` run) -
  ``StreamingJoin``: (impressions table, actions table) batches split by join-key shard, the
  engine-free ``transforms.shard_join.ShardJoin`` held per shard in Beam state with one
  event-time timer;
* backfill - ``BackfillJoin``: log files -> Arrow tables split into join-key shards
  (``ReadLogTableShards``) -> a GroupByKey -> ``JoinShardDoFn``, the columnar join of
  ``transforms.batch_join`` in event-time micro-batches, then ``ExampleBuilder`` on columns.

The record-level reference join is ``pipelines.beam_record_join``; sources, sinks and the
dead-letter output are ``pipelines.beam_io``.
"""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from pipelines.beam_io import DEAD, dead_letter_outputs
from schemas.dead_letters import DeadLetterSink
from schemas.events import arrow_schema, load_schema
from schemas.logs import read_log_table
from schemas.spec_types import FeatureSpec
from transforms.batch_join import join_tables, split_batch_by_shard, split_by_shard
from transforms.examples import ExampleBuilder
from transforms.join import JoinConfig
from transforms.shard_join import EntryList, ShardJoin


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
