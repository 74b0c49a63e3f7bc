"""The Flink job's Kafka source: impressions and actions topics -> event-time micro-batches.

``--source kafka://HOST:PORT[?impressions=T&actions=T&group=G&until=U&window_ms=N&out_of_order_ms=N&idle_ms=N]``

Both topics are read by Apache's ``KafkaSource`` (the Flink SQL ``kafka`` connector, ``raw``
values: one schemaless Avro event per record). Flink SQL batches them in the JVM, because a
Python call per record is what limits PyFlink (a DataStream ``KafkaSource`` into a Python map
moved ~3.3k records/s here): a tumbling event-time window of ``window_ms`` over both topics
aggregates each window's values, kinds, partitions and offsets into arrays (``ARRAY_AGG``), and
one row per window crosses to Python (``pipelines.flink_kafka``), which decodes it into the same
shard records as a live log file.

* **Event time** is the record's Kafka timestamp (``streamrec produce`` sets it to
  ``event_time_ms``). Watermarks are generated per partition, ``out_of_order_ms`` behind the
  newest timestamp (default: the spec's join window), and a partition without records for
  ``idle_ms`` (default 30 s) does not hold the watermark back.
* **Late records** (a timestamp at or behind the watermark when it arrives) would be dropped by
  the window; instead the same query routes them, flagged, to Python, where each becomes a
  ``late_event`` dead letter naming its topic, partition and offset.
* **Window**: live, ``window_ms`` defaults to the join's own granularity (the spec's join
  window), so batching adds no latency to an Example: the join closes an impression at a window
  boundary anyway. Bounded, latency does not matter but the number of windows does (each is a
  round trip through the Python workers; MovieLens' 7 months in 30-minute windows took 80 s
  instead of ~20): the default is the event time that holds ``events_per_step`` events at the
  topics' mean rate, from the timestamps at the start and end offsets (``bounded_window_ms``),
  and at least the join window.
* **Offsets**: ``group`` (default ``streamrec-SPEC``) starts from its committed offsets (the
  earliest where it has none); the source's offsets are part of every checkpoint and committed
  to Kafka when one completes. ``--resume`` restores them with the rest of the job.
* **End**: without ``until`` the job is live, stopped by draining. ``until`` bounds it:
  ``latest`` (each partition's end offset when the job first starts) or a JSON file of end
  offsets - ``{topic: {partition: offset}}``, or the summary ``streamrec produce`` prints. A
  broker whose ListOffsets is not exact (Tansu counts batches) needs the file. A bounded job
  keeps only the records below those offsets and is drained as soon as each partition's last
  record has reached Python (an end mark, outside the windows), or else once its group has
  committed them (a checkpoint completed after it read them): see ``kafka_batches``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from schemas.spec_types import FeatureSpec

MAX_INTERVAL_MS = 99 * 86_400_000  # the longest window or watermark delay a Flink SQL interval takes (DAY(2))
_PARAMETERS = ("impressions", "actions", "group", "until", "window_ms", "out_of_order_ms", "idle_ms")


@dataclass(frozen=True)
class KafkaSourceConfig:
    bootstrap: str  # HOST:PORT[,HOST:PORT...]
    impressions_topic: str = "impressions"
    actions_topic: str = "actions"
    group: str | None = None  # None: streamrec-SPEC
    until: str | None = None  # None (unbounded), "latest", or a JSON file of end offsets
    window_ms: int | None = None  # None: the spec's join window (bounded: see ``bounded_window_ms``)
    out_of_order_ms: int | None = None  # None: the spec's join window
    idle_ms: int = 30_000

    @classmethod
    def from_uri(cls, uri: str) -> "KafkaSourceConfig":
        """Parse ``kafka://HOST:PORT?...``; a bad URI raises ValueError naming the part."""
        parts = urlsplit(uri)
        if parts.scheme != "kafka" or not parts.netloc:
            raise ValueError(f"--source must be kafka://HOST:PORT[?impressions=T&actions=T&group=G&until=U], "
                             f"got {uri!r}")
        for address in parts.netloc.split(","):
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--source {uri!r}: {address!r} is not HOST:PORT")
        values: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
            if key not in _PARAMETERS:
                raise ValueError(f"--source {uri!r}: unknown parameter {key!r} (known: {', '.join(_PARAMETERS)})")
            if not value:
                raise ValueError(f"--source {uri!r}: parameter {key!r} is empty")
            values[key] = value
        numbers = {}
        for key in ("window_ms", "out_of_order_ms", "idle_ms"):
            if key in values:
                if not values[key].isdigit() or (key != "out_of_order_ms" and int(values[key]) == 0):
                    raise ValueError(f"--source {uri!r}: {key} must be a whole number of ms"
                                     f"{'' if key == 'out_of_order_ms' else ' > 0'}, got {values[key]!r}")
                numbers[key] = int(values[key])
                if numbers[key] > MAX_INTERVAL_MS:
                    raise ValueError(f"--source {uri!r}: {key} must be at most {MAX_INTERVAL_MS} ms (99 days)")
        config = cls(parts.netloc, values.get("impressions", "impressions"), values.get("actions", "actions"),
                     values.get("group"), values.get("until"), **numbers)
        if config.impressions_topic == config.actions_topic:
            raise ValueError(f"--source {uri!r}: impressions and actions need two topics")
        if config.until not in (None, "latest"):
            config.end_offsets()  # a missing or malformed file fails here, naming it
        return config

    @property
    def bounded(self) -> bool:
        return self.until is not None

    @property
    def topics(self) -> tuple[str, str]:
        return self.impressions_topic, self.actions_topic

    def window(self, spec: FeatureSpec) -> int:
        """The window (ms). The join closes impressions on a grid of max(join window, this), which
        must be a multiple of this: a ``window_ms`` shorter than the join window divides it."""
        window = self.window_ms or min(spec.join.window_ms, MAX_INTERVAL_MS)
        if window < spec.join.window_ms and spec.join.window_ms % window:
            raise ValueError(f"--source window_ms={window} must divide the spec's join window "
                             f"({spec.join.window_ms} ms) or be at least as long")
        return window

    def out_of_order(self, spec: FeatureSpec) -> int:
        return min(spec.join.window_ms, MAX_INTERVAL_MS) if self.out_of_order_ms is None else self.out_of_order_ms

    def group_id(self, spec: FeatureSpec) -> str:
        return self.group or f"streamrec-{spec.name}"

    def end_offsets(self) -> dict[str, dict[int, int]]:
        """``until``'s file: end offset per topic and partition (``streamrec produce``'s summary or
        ``{topic: {partition: offset}}``)."""
        path = Path(self.until)
        try:
            raw = json.loads(path.read_text().strip().splitlines()[-1])
            topics = raw["topics"] if "topics" in raw else raw
            ends = {topic: {int(p): int(o) for p, o in (entry.get("end_offsets", entry)).items()}
                    for topic, entry in topics.items()}
        except (OSError, IndexError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"--source until={self.until!r}: not a JSON file of end offsets "
                             f"({{topic: {{partition: offset}}}} or streamrec produce's summary): {exc}") from None
        for topic in self.topics:
            if topic not in ends:
                raise ValueError(f"--source until={self.until!r} has no end offsets for topic {topic!r}")
        return ends


def bounded_window_ms(config: KafkaSourceConfig, spec: FeatureSpec, ends: dict[str, dict[int, int]],
                      events_per_step: int) -> int:
    """The default window of a bounded source: ``events_per_step`` events at the mean event rate
    of the records it will read - their count from the start offsets (the group's committed
    ones, else the earliest) to the end offsets ``ends`` (``resolved_end_offsets``), their span
    from the timestamps there - and at least the join window. Falls back to the join window when
    the topics cannot be sampled."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": config.bootstrap, "group.id": config.group_id(spec),
                         "enable.auto.commit": False})
    try:
        wanted = [TopicPartition(topic, p) for topic in config.topics for p in ends[topic]]
        starts = {}
        for committed in consumer.committed(wanted, timeout=10):
            low = consumer.get_watermark_offsets(committed, timeout=10)[0]
            starts[(committed.topic, committed.partition)] = committed.offset if committed.offset >= 0 else low
        spans = {key: (start, ends[key[0]][key[1]]) for key, start in starts.items() if ends[key[0]][key[1]] > start}
        events = sum(end - start for start, end in spans.values())
        stamps = [stamp for side in (0, 1) for stamp in _timestamps_at(
            consumer, {key: span[0] if side == 0 else span[1] - 1 for key, span in spans.items()})]
    except Exception:  # noqa: BLE001 (a guess only: the job itself reports an unreachable broker)
        return config.window(spec)
    finally:
        consumer.close()
    if not events:
        return config.window(spec)
    span_ms = max(stamps) - min(stamps) + 1
    return min(MAX_INTERVAL_MS, max(spec.join.window_ms, round(span_ms * events_per_step / events)))


def _timestamps_at(consumer, offsets: dict[tuple[str, int], int], timeout_s: float = 10) -> list[int]:
    """The Kafka timestamps of the records at ``offsets`` ({(topic, partition): offset}), read in
    one assignment."""
    import time

    from confluent_kafka import TopicPartition

    consumer.assign([TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()])
    stamps: dict[tuple[str, int], int] = {}
    deadline = time.monotonic() + timeout_s
    while len(stamps) < len(offsets) and time.monotonic() < deadline:
        for message in consumer.consume(len(offsets) * 64, timeout=0.2):
            key = (message.topic(), message.partition())
            if message.error() is None and key not in stamps and message.offset() == offsets[key]:
                stamps[key] = message.timestamp()[1]
    if len(stamps) < len(offsets):
        raise RuntimeError(f"no records at {sorted(set(offsets) - set(stamps))}")
    return list(stamps.values())


def _interval(ms: int) -> str:
    """A Flink SQL interval of ``ms`` milliseconds."""
    if not 0 <= ms <= MAX_INTERVAL_MS:
        raise ValueError(f"an interval of {ms} ms is outside [0, {MAX_INTERVAL_MS}] (99 days)")
    days, rest = divmod(ms, 86_400_000)
    hours, rest = divmod(rest, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"INTERVAL '{days} {hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}' DAY TO SECOND(3)"


def _table_ddl(name: str, topic: str, config: KafkaSourceConfig, spec: FeatureSpec) -> str:
    options = {"connector": "kafka", "topic": topic, "properties.bootstrap.servers": config.bootstrap,
               "properties.group.id": config.group_id(spec), "properties.auto.offset.reset": "earliest",
               "scan.startup.mode": "group-offsets", "format": "raw",
               "scan.watermark.idle-timeout": f"{config.idle_ms} ms",
               # larger polls, shorter fetch waits: the consumer's defaults (500 records a poll,
               # 1 MiB a partition, 500 ms wait) took 60 s for 360k events, these 49 s
               "properties.max.poll.records": "20000", "properties.max.partition.fetch.bytes": "16777216",
               "properties.fetch.max.wait.ms": "20"}
    with_clause = ", ".join(f"'{key}' = '{value}'" for key, value in options.items())
    return (f"CREATE TEMPORARY TABLE {name} (v BYTES, p INT METADATA FROM 'partition' VIRTUAL, "
            f"o BIGINT METADATA FROM 'offset' VIRTUAL, ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp', "
            f"WATERMARK FOR ts AS ts - {_interval(config.out_of_order(spec))}) WITH ({with_clause})")


def kafka_batches(env, spec: FeatureSpec, config: KafkaSourceConfig, window_ms: int,
                  read_below: dict[str, dict[int, int]] | None = None):
    """The DataStream of window rows ``(time, late, kinds, values, partitions, offsets)`` over
    both topics, stamped with the window's time (a late record's own, alone in its row), with the
    sources' watermarks.

    ``read_below`` ({topic: {partition: end offset}}, a bounded source): only the records below
    these offsets are kept, and the last one of each partition also goes on as an end mark. The
    source itself stays unbounded and the runner drains the job once every end mark has reached
    the decoder (or its group has committed the end offsets: ``ends_committed``), because the connector's own
    bounded mode does not survive a restore: a restored bounded ``KafkaSource`` never finishes
    (FLINK-31006: its enumerator never signals "no more splits"), and a split that finished before
    the checkpoint is missing from its state, so the partition was read again from the start."""
    from pyflink.table import StreamTableEnvironment

    from schemas.kafka_records import END_MARK

    tables = StreamTableEnvironment.create(env)
    tables.get_config().set("table.exec.resource.default-parallelism", "1")  # one global window
    tables.get_config().set("table.local-time-zone", "UTC")  # windows aligned to the epoch, as the join's grid
    # One aggregation phase: a local pre-aggregate would merge partial ARRAY_AGG lists into the
    # global one's state again and again (with object reuse, 360k events: 0.8-1.7 s less of 21-26 s,
    # medians of runs alternated with the two-phase plan)
    tables.get_config().set("table.optimizer.agg-phase-strategy", "ONE_PHASE")
    names = ("impressions_topic", "actions_topic")
    for name, topic in zip(names, config.topics):
        tables.execute_sql(_table_ddl(name, topic, config, spec))
    where = {name: "" if read_below is None else " WHERE " + (" OR ".join(
        f"(p = {p} AND o < {o})" for p, o in sorted(read_below[topic].items())) or "FALSE")
        for name, topic in zip(names, config.topics)}
    # The late flag is computed once per record, where both branches below read it: the window's
    # watermark is never ahead of the one a record was flagged against, so an on-time record is
    # never late at the window, and a late one goes to the dead letters instead of being dropped.
    tables.create_temporary_view("events", tables.sql_query(
        "SELECT k, v, p, o, ts, COALESCE(ts <= CURRENT_WATERMARK(ts), FALSE) AS late FROM ("
        f"SELECT 0 AS k, v, p, o, ts FROM impressions_topic{where[names[0]]} UNION ALL "
        f"SELECT 1 AS k, v, p, o, ts FROM actions_topic{where[names[1]]})"))
    tables.create_temporary_view("on_time", tables.sql_query("SELECT k, v, p, o, ts FROM events WHERE NOT late"))
    window = _interval(window_ms)
    # A bounded source: each partition's last record below its end offset also goes to Python at
    # once, outside the windows, as an end mark (kind + END_MARK): once every partition's has
    # arrived, the source has emitted every record the job reads, and the runner can drain it
    # without waiting for a checkpoint to commit the end offsets (``DecodeKafkaBatches``).
    last = " OR ".join(f"(k = {kind} AND p = {p} AND o = {o - 1})" for kind, topic in enumerate(config.topics)
                       for p, o in sorted((read_below or {}).get(topic, {}).items()) if o > 0)
    marks = "" if not last else (f" UNION ALL SELECT ts AS t, FALSE AS late, ARRAY[k + {END_MARK}], ARRAY[v], "
                                 f"ARRAY[p], ARRAY[o] FROM events WHERE {last}")
    batches = tables.sql_query(
        f"SELECT window_time AS t, FALSE AS late, ARRAY_AGG(k) AS ks, ARRAY_AGG(v) AS vs, ARRAY_AGG(p) AS ps, "
        f"ARRAY_AGG(o) AS os FROM TABLE(TUMBLE(TABLE on_time, DESCRIPTOR(ts), {window})) "
        f"GROUP BY window_start, window_end, window_time "
        f"UNION ALL SELECT ts AS t, late, ARRAY[k], ARRAY[v], ARRAY[p], ARRAY[o] FROM events WHERE late{marks}")
    return tables.to_data_stream(batches)


def resolved_end_offsets(config: KafkaSourceConfig) -> dict[str, dict[int, int]]:
    """A bounded source's end offsets: ``until``'s file, or - ``latest`` - each partition's end
    offset now (ListOffsets; exact on Kafka, not on Tansu)."""
    if config.until != "latest":
        return config.end_offsets()
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": config.bootstrap, "group.id": "streamrec-offsets"})
    try:
        return {topic: {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                        for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions}
                for topic in config.topics}
    finally:
        consumer.close()


def ends_committed(config: KafkaSourceConfig, spec: FeatureSpec, ends: dict[str, dict[int, int]]) -> bool:
    """Whether the job's group has committed (a checkpoint completed after reading) every
    partition's end offset of ``ends``."""
    from confluent_kafka import Consumer, TopicPartition

    wanted = [TopicPartition(topic, p) for topic, partitions in ends.items() for p, end in partitions.items() if end > 0]
    if not wanted:
        return True
    consumer = Consumer({"bootstrap.servers": config.bootstrap, "group.id": config.group_id(spec),
                         "enable.auto.commit": False})
    try:
        committed = consumer.committed(wanted, timeout=10)
    except Exception:  # noqa: BLE001 (the broker busy or away: not yet)
        return False
    finally:
        consumer.close()
    return all(c.offset >= ends[c.topic][c.partition] for c in committed)


def commit_ends(config: KafkaSourceConfig, spec: FeatureSpec, ends: dict[str, dict[int, int]]) -> None:
    """Commit ``ends`` for the job's group: a bounded job drained on its end marks has processed
    every record below them, but the drain's savepoint does not commit the source's offsets, and
    a next job of the group must start there."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": config.bootstrap, "group.id": config.group_id(spec),
                         "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, end) for topic, partitions in ends.items()
                                 for p, end in partitions.items() if end > 0], asynchronous=False)
    finally:
        consumer.close()


def connector_jar_uris(jars: str | None) -> list[str]:
    """``pipeline.jars`` entries for the connector (``runners.kafka_assets.connector_jars``)."""
    from runners.kafka_assets import connector_jars

    return [path.resolve().as_uri() for path in connector_jars(jars)]
