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

A bounded source also sends each partition's last record as an end mark (a kind at or above
``END_MARK``, outside the windows): when every expected partition's mark has arrived, the source
has emitted every record the job reads, and the decoder writes ``read_marker`` for the runner to
drain the job. A (re)started decoder removes the marker first: a restore re-reads the records
after its checkpoint, and if the marks came before that checkpoint the runner falls back on the
group's committed offsets.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from pyflink.datastream import ProcessFunction, RuntimeContext

from pipelines.busy_clock import BusyClock
from pipelines.flink_records import dead_letter_records
from pipelines.tables import spill_shards
from schemas.kafka_records import END_MARK
from schemas.spec_types import FeatureSpec


class DecodeKafkaBatches(ProcessFunction):
    def __init__(self, spec: FeatureSpec, topics: tuple[str, str], shards: int, spill_dir: str,
                 timing_dir: str | None = None, read_below: dict[str, dict[int, int]] | None = None,
                 read_marker: str | None = None):
        self.spec, self.topics, self.shards, self.timing_dir = spec, topics, shards, timing_dir
        self.spill_dir, self.read_marker = spill_dir, read_marker
        # the end marks a bounded source sends: (topic, partition) of every partition it reads
        self.expected_marks = {(topic, p) for topic, ends in (read_below or {}).items() for p, end in ends.items()
                               if end > 0}

    def open(self, runtime_context: RuntimeContext):
        from schemas.events import log_schemas

        self.schemas = log_schemas(self.spec.events)
        self.clock = BusyClock("decode", self.timing_dir)
        self.marks: set[tuple[str, int]] = set()
        if self.read_marker is not None:
            Path(self.read_marker).unlink(missing_ok=True)

    def close(self):
        self.clock.write()

    def process_element(self, value, ctx: ProcessFunction.Context):
        from schemas.dead_letters import DeadLetterSink
        from schemas.kafka_records import KafkaBatch, decode_batch

        with self.clock:
            _, late, kinds, values, partitions, offsets = value
            if kinds[0] >= END_MARK:
                self._end_mark(self.topics[kinds[0] - END_MARK], partitions[0])
                return []
            sink = DeadLetterSink(keep=None)
            impressions, actions = decode_batch(KafkaBatch(kinds, values, partitions, offsets, late=bool(late)),
                                                self.topics, self.schemas, sink, self.spec.events.time_range_ms)
            out = dead_letter_records(sink.letters)
            if impressions.num_rows or actions.num_rows:
                out += spill_shards(impressions, actions, self.shards, Path(self.spill_dir), uuid.uuid4().hex)
            return out

    def _end_mark(self, topic: str, partition: int) -> None:
        self.marks.add((topic, partition))
        if self.read_marker is not None and self.expected_marks and self.expected_marks <= self.marks:
            Path(self.read_marker).write_text("every partition's last record reached the decoder\n")
