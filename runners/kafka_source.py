"""The Flink job's Kafka source: impressions and actions topics -> Arrow batches decoded in Python.

``--source kafka://HOST:PORT[?impressions=T&actions=T&group=G&until=U&window_ms=N&out_of_order_ms=N&idle_ms=N]``

Both topics are read by one Apache ``KafkaSource`` (the Flink SQL ``kafka`` connector over the
two topics, ``raw`` values: one schemaless Avro event per record). A Python call per record is
what limits PyFlink (a DataStream ``KafkaSource`` into a Python map moved ~3.3k records/s here,
30k/s with nothing in the map), so the records cross to Python as **Arrow batches**: a
vectorized UDF (``pipelines.flink_kafka``) takes each batch's values, topics, partitions,
offsets and late flags as columns and decodes them into the same shard records as a live log
file. No state holds the records: a watermark passes the Python operator only after the batch
in flight, so downstream a watermark M still says every on-time record at or before M is in.
(Until 2026-12-05 a tumbling event-time window aggregated each window's records into arrays in
the JVM first; that ``ARRAY_AGG`` in RocksDB state was most of the job's time.)

* **Event time** is the record's Kafka timestamp (``streamrec produce`` sets it to
  ``event_time_ms``). Watermarks are generated per partition, ``out_of_order_ms`` behind the
  newest timestamp (default: the spec's join window), and a partition without records for
  ``idle_ms`` (default 30 s) does not hold the watermark back.
* **Late records** (a timestamp at or behind the watermark when it arrives: the join may have
  closed its window) are flagged in the JVM as they arrive; each becomes a ``late_event`` dead
  letter naming its topic, partition and offset.
* **Batches**: up to ``events_per_step`` records, and a bundle ends every second, so a live
  record reaches the join within about a second; a bounded job of 8 batches or more takes 5 s
  bundles and has its last batch sent by a checkpoint once the records left fit in it
  (``kafka_batches``). ``window_ms`` is the event-time grid the join
  emits Examples and the trainer trains on (``JoinShard``'s and ``TrainStream``'s timers): live
  it defaults to the spec's join window (the join closes an impression at such a boundary
  anyway); bounded, to the event time that holds ``events_per_step`` events at the topics'
  mean rate, from the timestamps at the start and end offsets (``bounded_window_ms``), and at
  least the join window (fewer timers: MovieLens' 7 months on a 30-minute grid took 80 s
  instead of ~20).
* **Offsets**: ``group`` (default ``streamrec-SPEC``) starts from its committed offsets (the
  earliest where it has none); the source's offsets are part of every checkpoint and committed
  to Kafka when one completes. ``--resume`` restores them with the rest of the job.
* **End**: without ``until`` the job is live, stopped by draining. ``until`` bounds it:
  ``latest`` (each partition's end offset when the job first starts) or a JSON file of end
  offsets - ``{topic: {partition: offset}}``, or the summary ``streamrec produce`` prints. A
  broker whose ListOffsets is not exact (Tansu counts batches) needs the file. A bounded job
  keeps only the records below those offsets and is drained as soon as each partition's last
  record has been decoded (an end mark), or else once its group has committed them (a
  checkpoint completed after it read them): see ``kafka_batches``.
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
    window_ms: int | None = None  # the emission grid; None: the join window (bounded: ``bounded_window_ms``)
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
        """The emission grid (ms): the join closes impressions on a grid of max(join window, this),
        which must be a multiple of this: a ``window_ms`` shorter than the join window divides it."""
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


@dataclass(frozen=True)
class BoundedExtent:
    """What a bounded source will read: ``records`` from the start offsets (the group's committed
    ones, else the earliest) to the end offsets, over ``span_ms`` of Kafka timestamps."""

    records: int
    span_ms: int


def bounded_extent(config: KafkaSourceConfig, spec: FeatureSpec,
                   ends: dict[str, dict[int, int]]) -> BoundedExtent | None:
    """The records below ``ends`` (``resolved_end_offsets``) a bounded source will read, and
    their span from the timestamps at the start and end offsets; None when the topics cannot be
    sampled (the job itself reports an unreachable broker)."""
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
        records = sum(end - start for start, end in spans.values())
        stamps = [stamp for side in (0, 1) for stamp in _timestamps_at(
            consumer, {key: span[0] if side == 0 else span[1] - 1 for key, span in spans.items()})]
    except Exception:  # noqa: BLE001 (a guess only)
        return None
    finally:
        consumer.close()
    return BoundedExtent(records, max(stamps) - min(stamps) + 1 if stamps else 0)


def bounded_window_ms(config: KafkaSourceConfig, spec: FeatureSpec, extent: BoundedExtent | None,
                      events_per_step: int) -> int:
    """The default grid (``window_ms``) of a bounded source: ``events_per_step`` events at the mean
    event rate of the records it will read (``bounded_extent``), and at least the join window;
    the join window where nothing is known."""
    if extent is None or not extent.records:
        return config.window(spec)
    return min(MAX_INTERVAL_MS, max(spec.join.window_ms, round(extent.span_ms * events_per_step / extent.records)))


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


def _table_ddl(name: str, config: KafkaSourceConfig, spec: FeatureSpec) -> str:
    """One table over both topics (one ``KafkaSource``: one operator decodes every record, and the
    watermark is the minimum over every partition of both)."""
    options = {"connector": "kafka", "topic": ";".join(config.topics),
               "properties.bootstrap.servers": config.bootstrap,
               "properties.group.id": config.group_id(spec), "properties.auto.offset.reset": "earliest",
               "scan.startup.mode": "group-offsets", "format": "raw",
               "scan.watermark.idle-timeout": f"{config.idle_ms} ms",
               # larger polls, shorter fetch waits: the consumer's defaults (500 records a poll,
               # 1 MiB a partition, 500 ms wait) took 60 s for 360k events, these 49 s
               "properties.max.poll.records": "20000", "properties.max.partition.fetch.bytes": "16777216",
               "properties.fetch.max.wait.ms": "20"}
    with_clause = ", ".join(f"'{key}' = '{value}'" for key, value in options.items())
    return (f"CREATE TEMPORARY TABLE {name} (v BYTES, topic STRING METADATA FROM 'topic' VIRTUAL, "
            f"p INT METADATA FROM 'partition' VIRTUAL, o BIGINT METADATA FROM 'offset' VIRTUAL, "
            f"ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp', "
            f"WATERMARK FOR ts AS ts - {_interval(config.out_of_order(spec))}) WITH ({with_clause})")


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


LIVE_BUNDLE_MS = 1_000  # the decoder's bundles: how long a live record may wait for its batch
BOUNDED_BUNDLE_MS = 5_000  # ... in a large bounded job, which flushes its last batch itself


def kafka_batches(env, spec: FeatureSpec, config: KafkaSourceConfig, decoder, batch_records: int,
                  read_below: dict[str, dict[int, int]] | None = None, bundle_ms: int = LIVE_BUNDLE_MS):
    """The DataStream of ``(time, decoded)`` rows: the records of both topics in Arrow batches of
    up to ``batch_records`` through ``decoder`` (a vectorized Python UDF,
    ``pipelines.flink_kafka.kafka_decoder``, called as ``decoder(v, kind, partition, offset,
    late)``), one row per batch carrying what it made; with the source's watermarks.

    The records cross to Python as Arrow columns, without state: a watermark leaves the Python
    operator only after the batch in flight (PyFlink finishes a bundle first), so a watermark M
    downstream says every on-time record at or before M has been decoded. (Before, a tumbling
    event-time window aggregated each window's records into arrays in the JVM - ``ARRAY_AGG``,
    RocksDB state - and that aggregate alone took 14 of the 19 s the JVM needed for 360k events.)

    ``late``: a record whose timestamp is at or behind the watermark when it arrives (computed
    in the JVM before the batch is formed) - the join has closed its window - goes to the dead
    letters.

    ``read_below`` ({topic: {partition: end offset}}, a bounded source): only the records below
    these offsets are kept, and the decoder notes each partition's last one (an end mark). The
    source itself stays unbounded and the runner drains the job once every end mark has been
    decoded (or its group has committed the end offsets: ``ends_committed``), because the
    connector's own bounded mode does not survive a restore: a restored bounded ``KafkaSource``
    never finishes (FLINK-31006: its enumerator never signals "no more splits"), and a split
    that finished before the checkpoint is missing from its state, so the partition was read
    again from the start."""
    from pyflink.table import StreamTableEnvironment
    from pyflink.util.java_utils import get_j_env_configuration

    tables = StreamTableEnvironment.create(env)
    table_config = tables.get_config()
    table_config.set("table.exec.resource.default-parallelism", "1")  # one decoder: the end marks meet there
    table_config.set("table.local-time-zone", "UTC")
    # The decoder's batches and bundles (for the SQL's Python operator only: they override the
    # job's bundle size, 1 for a training job). Within a bundle the JVM sends the next batch while
    # Python decodes one; at a bundle's end the JVM waits until Python has decoded them all, then
    # fills the next bundle's first batch while Python waits (a bundle of one batch: 360k events
    # decoded over 11 s; bundles of 8: 6.8 s). A bundle also ends after ``bundle_ms``, which is
    # how long a record may wait for a batch that does not fill: 1 s live. A large bounded job
    # takes 5 s bundles (3 s bundles on the 360k events: the decoder's calls span 2.7-2.9 s
    # instead of 4.5, the job ends 1.4-2.2 s sooner) and ends its last bundle itself: once the
    # records left fit in the batch being filled, the decoder says so (``last_batch_marker``) and
    # the runner triggers a checkpoint, whose barrier ends the bundle.
    decoder_settings = {"python.fn-execution.bundle.size": str(1_000 * batch_records),
                        "python.fn-execution.arrow.batch.size": str(batch_records),
                        "python.fn-execution.bundle.time": str(bundle_ms)}
    # The planner copies the table's settings into the job's before it translates (Flink's
    # ``PlannerBase.beforeTranslation``), and at ``execute`` the job's Python settings go into
    # every DataStream Python operator: the job's own are put back after the translation, else
    # the decoder's bundles would also be the join's and the trainer's (a training job's trainer
    # takes one record a bundle). The decoder's operator keeps the copy it was translated with.
    job_config = get_j_env_configuration(env._j_stream_execution_environment)
    job_settings = {key: job_config.getString(key, None) for key in decoder_settings}
    for key, value in decoder_settings.items():
        table_config.set(key, value)
    tables.execute_sql(_table_ddl("topics", config, spec))
    tables.create_temporary_function("decode_kafka", decoder)
    kind = (f"CASE WHEN topic = {_sql_string(config.impressions_topic)} THEN 0 "
            f"WHEN topic = {_sql_string(config.actions_topic)} THEN 1 END")
    where = "" if read_below is None else " WHERE " + (" OR ".join(
        f"(topic = {_sql_string(topic)} AND p = {p} AND o < {o})"
        for topic in config.topics for p, o in sorted(read_below[topic].items())) or "FALSE")
    # The late flag is computed in the JVM as each record arrives, against the watermark then.
    records = (f"SELECT v, {kind} AS k, p, o, COALESCE(ts <= CURRENT_WATERMARK(ts), FALSE) AS late, ts "
               f"FROM topics{where}")
    batches = tables.sql_query(f"SELECT ts AS t, decoded FROM (SELECT ts, decode_kafka(v, k, p, o, late) AS decoded "
                               f"FROM ({records})) WHERE decoded IS NOT NULL")
    stream = tables.to_data_stream(batches)
    for key, value in job_settings.items():
        job_config.removeKey(key) if value is None else job_config.setString(key, value)
    return stream


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
