"""Kafka records of event logs -> Arrow micro-batches, bad records to dead letters.

A record's value is one event encoded with the spec's event schema as **schemaless Avro** (no
Confluent wire-format header), as ``streamrec produce`` writes it. A value that does not decode
to exactly one record of that schema (garbage, a truncated record, trailing bytes, an empty or
null value), or whose event time is outside the spec's range, is a dead letter naming its topic,
partition and offset; so is a record the source flagged as later than its watermark.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import fastavro
import numpy as np
import pyarrow as pa

from schemas.avro_columns import decode_columns, supports
from schemas.dead_letters import DeadLetter, DeadLetterSink, record_json
from schemas.events import EVENT_TIME_RANGE_MS, arrow_schema

KINDS = ("impressions", "actions")  # kind codes 0 and 1 of a batch



@dataclass(frozen=True)
class KafkaBatch:
    """Records of both topics, as the source aggregated them: parallel sequences, one entry per
    record (``kinds``: 0 impressions, 1 actions)."""

    kinds: Sequence[int]
    values: Sequence[bytes | None]
    partitions: Sequence[int]
    offsets: Sequence[int]
    late: bool = False  # every record here came at or behind the source's watermark


def _where(topic: str, partition: int, offset: int) -> str:
    return f"kafka topic {topic!r} partition {partition} offset {offset}"


def _decode(value: bytes | None, schema: dict) -> dict:
    """One schemaless Avro value -> its record; ValueError when it is not exactly one record."""
    if not value:
        raise ValueError("empty value" if value is not None else "null value (a tombstone)")
    buffer = io.BytesIO(value)
    try:
        record = fastavro.schemaless_reader(buffer, schema, None)
    except (EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError, UnicodeDecodeError,
            fastavro.read.SchemaResolutionError) as exc:
        raise ValueError(f"not a schemaless Avro {schema.get('name')!r} record ({type(exc).__name__}: {exc})") from None
    if buffer.tell() != len(value):
        raise ValueError(f"{len(value) - buffer.tell()} bytes after a schemaless Avro {schema.get('name')!r} "
                         f"record of {buffer.tell()} bytes")
    return record


def decode_batch(batch: KafkaBatch, topics: tuple[str, str], schemas: dict[str, dict], dead_letters: DeadLetterSink,
                 time_range_ms: tuple[int, int] = EVENT_TIME_RANGE_MS) -> tuple[pa.Table, pa.Table]:
    """A batch -> (impressions, actions) Arrow tables in the spec's event schemas (``schemas``: the
    parsed schema per kind, ``topics``: the topic name per kind code); every other record goes to
    ``dead_letters`` (stage "read") with its topic, partition and offset.

    Values are decoded for all records at once (``schemas.avro_columns``) where the schema
    allows; the records that fail - and every record of another schema - are read one by one by
    fastavro, whose verdict and message the dead letter carries."""
    kinds = np.asarray(batch.kinds, dtype=np.int64)
    return tuple(_decode_kind(batch, np.flatnonzero(kinds == kind), topics[kind], schemas[KINDS[kind]],
                              dead_letters, time_range_ms) for kind in (0, 1))


def _decode_kind(batch: KafkaBatch, index: np.ndarray, topic: str, schema: dict, dead_letters: DeadLetterSink,
                 time_range_ms: tuple[int, int]) -> pa.Table:
    target = arrow_schema(schema)

    def letter(i: int, reason: str, detail: str, record: str) -> None:
        partition, offset = batch.partitions[i], batch.offsets[i]
        dead_letters.add(DeadLetter("read", reason, f"{_where(topic, partition, offset)}: {detail}",
                                    f"kafka:{topic}/{partition}@{offset}", record))

    values = [batch.values[i] for i in index]
    if supports(schema) and values:
        table, bad = decode_columns([value or b"" for value in values], schema)
        table, kept = table.filter(pa.array(~bad)), index[~bad]
        retry = index[bad]
    else:
        table, kept, retry = target.empty_table(), index[:0], index
    rows, rows_at = [], []
    for i in retry:  # one by one: fastavro's verdict, and its message for the dead letter
        value = batch.values[i]
        try:
            rows.append(_decode(value, schema))
            rows_at.append(i)
        except ValueError as exc:
            letter(i, "undecodable_record", str(exc), record_json((value or b"")[:256].hex()))
    if rows:
        table = pa.concat_tables([table, pa.Table.from_pylist(rows, schema=target)])
        kept = np.concatenate([kept, np.asarray(rows_at, dtype=np.int64)])
    if "event_time_ms" in table.column_names and table.num_rows:
        times = table.column("event_time_ms").to_numpy(zero_copy_only=False)
        outside = (times < time_range_ms[0]) | (times >= time_range_ms[1])
        if outside.any():
            for i, row in zip(kept[outside], table.filter(pa.array(outside)).to_pylist()):
                letter(i, "event_time_out_of_range", f"event_time_ms {row['event_time_ms']} is outside "
                       f"[{time_range_ms[0]}, {time_range_ms[1]}) ms", record_json(row))
            table, kept = table.filter(pa.array(~outside)), kept[~outside]
    if batch.late and table.num_rows:
        for i, row in zip(kept, table.to_pylist()):
            letter(i, "late_event", "its Kafka timestamp came at or behind the source's watermark (more out "
                   "of order than its out_of_order_ms)", record_json(row))
        table = target.empty_table()
    return table
