"""Kafka window rows (``runners.kafka_source``) -> the join's shard records, on PyFlink.

One row per event-time window of both topics (or per late record) arrives with the arrays the
JVM aggregated; ``DecodeKafkaBatches`` decodes it (``schemas.kafka_records``: bad and late
records to dead letters naming topic, partition and offset) and splits it into one shard record
per join-key shard, carrying the Arrow tables themselves, as ``ReadAnnouncedLogs`` does for a
live log file. The source's watermarks pass through unchanged.
"""
from __future__ import annotations

from pyflink.datastream import ProcessFunction, RuntimeContext

from pipelines.busy_clock import BusyClock
from pipelines.flink_records import dead_letter_records
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
                out += self._spilled(impressions, actions)
            return out

    def _spilled(self, impressions, actions) -> list[tuple[int, str, str]]:
        import uuid
        from pathlib import Path

        from pipelines.tables import spill_table
        from transforms.batch_join import split_batch_by_shard

        name = uuid.uuid4().hex
        return [(shard, spill_table(impressions_part, Path(self.spill_dir) / f"{name}-{shard}-impressions.arrow"),
                 spill_table(actions_part, Path(self.spill_dir) / f"{name}-{shard}-actions.arrow"))
                for shard, impressions_part, actions_part in split_batch_by_shard(impressions, actions, self.shards)]
