"""Kafka records (``runners.kafka_source``) -> the join's shard records, on PyFlink.

The records of both topics reach ``KafkaDecoder``, a vectorized (pandas) Python UDF in the
source's SQL, as Arrow batches of columns: value, kind, partition, offset, late flag. Each batch
is decoded at once (``schemas.kafka_records``: bad and late records to dead letters naming topic,
partition and offset) and split into one shard record per join-key shard. As in a replay, each
shard's tables are spilled to Arrow IPC files under ``spill_dir`` and the record carries their
paths, so the join keeps paths in its state, not the tables (with the tables in keyed state the
join of 360k synthetic events was busy 22-25 s, with paths 3.5 s). A checkpoint that names a
file was taken after the file was written; the files of a killed attempt that no checkpoint
names go when the job ends.

A scalar UDF answers one value per row: the batch's output records, pickled, ride on its last
row and the other rows are NULL (the SQL keeps only the non-NULL ones); ``EmitDecoded`` sends
them on, dead letters to their side output.

A bounded source: the decoder notes each expected partition's last record (the offset below its
end offset); when every one has been decoded, the source has emitted every record the job
reads, and the decoder writes ``read_marker`` for the runner to drain the job. A (re)started
decoder removes the marker first: a restore re-reads the records after its checkpoint, and if
the last ones came before that checkpoint the runner falls back on the group's committed
offsets. With long bundles the decoder also notes when the records left fit in one batch
(``last_batch_marker``), for the runner to send that batch at once.
"""
from __future__ import annotations

import pickle
import uuid
from pathlib import Path

from pyflink.datastream import ProcessFunction
from pyflink.table import DataTypes
from pyflink.table.udf import FunctionContext, ScalarFunction, udf

from pipelines.busy_clock import BusyClock
from pipelines.flink_records import DEAD_LETTERS
from pipelines.tables import spill_shards
from schemas.spec_types import FeatureSpec

_DEAD_LETTER, _SHARD_RECORD = 0, 1  # what an output record of the decoder is


class KafkaDecoder(ScalarFunction):
    def __init__(self, spec: FeatureSpec, topics: tuple[str, str], shards: int, spill_dir: str,
                 timing_dir: str | None = None, read_below: dict[str, dict[int, int]] | None = None,
                 read_marker: str | None = None, batch_records: int = 0):
        self.spec, self.topics, self.shards, self.timing_dir = spec, topics, shards, timing_dir
        self.spill_dir, self.read_marker, self.batch_records = spill_dir, read_marker, batch_records
        # the offset of the last record of every partition a bounded source reads: (kind, partition) -> offset
        self.last_offsets = {(kind, p): end - 1 for kind, topic in enumerate(topics)
                             for p, end in (read_below or {}).get(topic, {}).items() if end > 0}

    def open(self, function_context: FunctionContext):
        from schemas.events import log_schemas

        self.schemas = log_schemas(self.spec.events)
        self.clock = BusyClock("decode", self.timing_dir)
        # (kind, partition) -> the highest offset decoded; the source keeps only offsets below the
        # end, so a partition's last record has come once this reaches its ``last_offsets``
        self.newest: dict[tuple[int, int], int] = {}
        if self.read_marker is not None:
            Path(self.read_marker).unlink(missing_ok=True)
            last_batch_marker(self.read_marker).unlink(missing_ok=True)

    def close(self):
        self.clock.write()

    def eval(self, values, kinds, partitions, offsets, late):
        import numpy as np
        import pandas as pd

        from schemas.dead_letters import DeadLetterSink
        from schemas.kafka_records import KafkaBatch, decode_batch

        with self.clock:
            rows = len(values)
            # (a column the planner folded to one value arrives as that value)
            kinds, partitions, offsets, late = (np.asarray(c.to_numpy() if isinstance(c, pd.Series) else [c] * rows)
                                                for c in (kinds, partitions, offsets, late))
            values = values.tolist()
            sink = DeadLetterSink(keep=None)
            out: list[tuple[int, object]] = []
            for flagged in (False, True):
                chosen = np.flatnonzero(late.astype(bool) == flagged)
                if not len(chosen):
                    continue
                batch = KafkaBatch(kinds[chosen], [values[i] for i in chosen], partitions[chosen], offsets[chosen],
                                   late=flagged)
                impressions, actions = decode_batch(batch, self.topics, self.schemas, sink,
                                                    self.spec.events.time_range_ms)
                if impressions.num_rows or actions.num_rows:
                    out += [(_SHARD_RECORD, record) for record in spill_shards(
                        impressions, actions, self.shards, Path(self.spill_dir), uuid.uuid4().hex)]
            out = [(_DEAD_LETTER, letter.to_json()) for letter in sink.letters] + out
            if self.last_offsets:
                self._note_marks(kinds, partitions, offsets)
            result = pd.Series([None] * rows, dtype=object)
            if out:
                result.iloc[-1] = pickle.dumps(out)
            return result

    def _note_marks(self, kinds, partitions, offsets) -> None:
        for key in self.last_offsets:
            mine = offsets[(kinds == key[0]) & (partitions == key[1])]
            if len(mine):
                self.newest[key] = max(self.newest.get(key, -1), int(mine.max()))
        if self.read_marker is None or len(self.newest) < len(self.last_offsets):
            return  # (a partition not seen yet: how much is left there is not known)
        left = sum(last - self.newest[key] for key, last in self.last_offsets.items())
        if left == 0:
            Path(self.read_marker).write_text("every partition's last record reached the decoder\n")
        elif left < self.batch_records:
            last_batch_marker(self.read_marker).write_text("the records left fit in the batch being filled\n")


def last_batch_marker(read_marker: str | Path) -> Path:
    """Written beside ``read_marker`` once the records a bounded job has left to decode fit in
    one batch (``batch_records``): the batch the JVM is filling will not fill, and only a
    bundle's end sends it - the runner ends the bundle with a checkpoint rather than wait for
    the bundle's timer (``kafka_source.kafka_batches``)."""
    return Path(read_marker).with_name(Path(read_marker).name + ".last-batch")


def kafka_decoder(spec: FeatureSpec, topics: tuple[str, str], shards: int, spill_dir: str,
                  timing_dir: str | None = None, read_below: dict[str, dict[int, int]] | None = None,
                  read_marker: str | None = None, batch_records: int = 0):
    """``KafkaDecoder`` as the vectorized UDF ``decode_kafka(v, kind, partition, offset, late)``;
    ``batch_records``: the Arrow batch size, for ``last_batch_marker`` (0: none written)."""
    return udf(KafkaDecoder(spec, topics, shards, spill_dir, timing_dir, read_below, read_marker, batch_records),
               result_type=DataTypes.BYTES(), func_type="pandas")


class EmitDecoded(ProcessFunction):
    """A decoder row ``(time, pickled records)`` -> its shard records, and its dead letters to the
    ``DEAD_LETTERS`` side output."""

    def process_element(self, value, ctx: ProcessFunction.Context):
        for kind, record in pickle.loads(value[1]):
            yield (DEAD_LETTERS, record) if kind == _DEAD_LETTER else record
