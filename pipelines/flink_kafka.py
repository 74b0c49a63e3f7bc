"""Kafka window rows (``runners.kafka_source``) -> the join's shard records, on PyFlink.

One row per event-time window of both topics (or per late record) arrives with the arrays the
JVM aggregated; ``DecodeKafkaBatches`` decodes it (``schemas.kafka_records``: bad and late
records to dead letters naming topic, partition and offset) and splits it into one shard record
per join-key shard. As in a replay, each shard's tables are spilled to Arrow IPC files under
``spill_dir`` and the record carries their paths, so the join keeps paths in its state, not the
tables (with the tables in keyed state the join of 360k synthetic events was busy 22-25 s, with
paths 3.5 s). A checkpoint that names a file was taken after the file was written; the files of
a killed attempt that no checkpoint names go when the job ends. The source's watermarks pass
through unchanged.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from pyflink.datastream import ProcessFunction, RuntimeContext

from pipelines.busy_clock import BusyClock
from pipelines.flink_records import dead_letter_records
from pipelines.tables import spill_shards
from schemas.spec_types import FeatureSpec


class DecodeKafkaBatches(ProcessFunction):
    def __init__(self, spec: FeatureSpec, topics: tuple[str, str], shards: int, spill_dir: str,
                 timing_dir: str | None = None):
        self.spec, self.topics, self.shards, self.timing_dir = spec, topics, shards, timing_dir
        self.spill_dir = spill_dir

    def open(self, runtime_context: RuntimeContext):
        from schemas.events import log_schemas

        self.schemas = log_schemas(self.spec.events)
        self.clock = BusyClock("decode", self.timing_dir)

    def close(self):
        self.clock.write()

    def process_element(self, value, ctx: ProcessFunction.Context):
        from schemas.dead_letters import DeadLetterSink
        from schemas.kafka_records import KafkaBatch, decode_batch

        with self.clock:
            _, late, kinds, values, partitions, offsets = value
            sink = DeadLetterSink(keep=None)
            impressions, actions = decode_batch(KafkaBatch(kinds, values, partitions, offsets, late=bool(late)),
                                                self.topics, self.schemas, sink, self.spec.events.time_range_ms)
            out = dead_letter_records(sink.letters)
            if impressions.num_rows or actions.num_rows:
                out += spill_shards(impressions, actions, self.shards, Path(self.spill_dir), uuid.uuid4().hex)
            return out
