"""``streamrec produce``: replay event logs into Kafka topics in event-time order.

Impressions and actions are merged by event time (each kind's files are in time order) and sent
as **schemaless Avro**: each record's value is the record encoded with the spec's event schema
(``fastavro.schemaless_writer``), with no Confluent wire-format header or schema registry; the
key is the record's ``request_id`` (a request's events share a partition) and the Kafka
timestamp its ``event_time_ms``. Topics that do not exist are created with ``partitions``
partitions. Bad log records go to the summary's dead letters, as ``logs check`` reports them.

The summary names, per topic, the records sent and each partition's end offset as the broker
acknowledged it (the last offset + 1): a reader that must stop at the end of a replay stops
there (a bounded "latest" is not reliable on every broker, see ``runners.kafka_broker``).
"""
from __future__ import annotations

import heapq
import io
import time
from pathlib import Path

from schemas.spec_types import FeatureSpec

KINDS = ("impressions", "actions")


def _records(spec: FeatureSpec, log_dir: Path, dead_letters):
    """(event time, kind, record) of both kinds, merged in event-time order."""
    from schemas.events import log_schemas
    from schemas.logs import log_files, read_log_file

    schemas = log_schemas(spec.events)  # (parsed by fastavro already)

    def of_kind(kind: str):
        for path in log_files(log_dir, kind):
            for record in read_log_file(path, schemas[kind], dead_letters, time_range_ms=spec.events.time_range_ms):
                yield record["event_time_ms"], kind, record

    return schemas, heapq.merge(*(of_kind(kind) for kind in KINDS), key=lambda item: item[0])


def produce_logs(spec: FeatureSpec, log_dir: str | Path, bootstrap: str, topics: dict[str, str] | None = None,
                 rate: float | None = None, partitions: int = 2) -> dict:
    """Send the logs of ``log_dir`` to ``topics`` ({"impressions": name, "actions": name}) at
    ``rate`` events/s (None: as fast as the broker takes them); returns the summary."""
    import fastavro
    from confluent_kafka import KafkaException, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from schemas.dead_letters import DeadLetterSink

    topics = topics or {kind: kind for kind in KINDS}
    dead_letters = DeadLetterSink()
    schemas, records = _records(spec, Path(log_dir), dead_letters)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        existing = admin.list_topics(timeout=10).topics
    except KafkaException as exc:
        raise RuntimeError(f"the Kafka broker at --bootstrap {bootstrap} did not answer: {exc}") from exc
    created = [NewTopic(name, num_partitions=partitions, replication_factor=1)
               for name in topics.values() if name not in existing]
    for name, future in (admin.create_topics(created).items() if created else []):
        future.result(30)
    end_offsets: dict[str, dict[int, int]] = {name: {} for name in topics.values()}
    failures: list[str] = []

    def delivered(error, message) -> None:
        if error is not None:
            failures.append(f"{message.topic()}: {error}")
            return
        ends = end_offsets[message.topic()]
        ends[message.partition()] = max(ends.get(message.partition(), 0), message.offset() + 1)

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all",
                         "enable.idempotence": False, "queue.buffering.max.messages": 1_000_000})
    sent = {name: 0 for name in topics.values()}
    started = time.monotonic()
    count = 0
    buffer = io.BytesIO()
    for event_time_ms, kind, record in records:
        buffer.seek(0)
        buffer.truncate()
        fastavro.schemaless_writer(buffer, schemas[kind], record)
        topic = topics[kind]
        while True:
            try:
                producer.produce(topic, value=buffer.getvalue(), key=str(record["request_id"]).encode(),
                                 timestamp=int(event_time_ms), on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.1)
        sent[topic] += 1
        count += 1
        if count % 10_000 == 0:
            producer.poll(0)
        if rate is not None:
            ahead = count / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    left = producer.flush(120)
    if left or failures:
        raise RuntimeError(f"{left} records not delivered to {bootstrap}; {len(failures)} failed, e.g. {failures[:3]}")
    seconds = time.monotonic() - started
    return {"bootstrap": bootstrap, "topics": {name: {"records": sent[name], "end_offsets": end_offsets[name]}
                                               for name in topics.values()},
            "events": count, "seconds": round(seconds, 3), "events_per_s": round(count / max(seconds, 1e-9)),
            "format": "schemaless Avro (the spec's event schemas), key request_id, timestamp event_time_ms",
            "dead_letters": dict(dead_letters.counts)}
