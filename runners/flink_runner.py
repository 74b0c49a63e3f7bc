"""Runs the job on PyFlink: a local mini-cluster by default, a standalone cluster on request.

The logs are replayed in event-time order as micro-batches (spilled to Arrow IPC files by join-key
shard; a batch-list file is the checkpointed source) and flow through
``pipelines.flink_join`` and, when training, ``pipelines.flink_train``. Python operators run in
process mode (torch must not run in thread mode); state lives in RocksDB and checkpoints go to
``OUT/.checkpoints`` every ``checkpoint_every_ms``, retained when the job dies.

Outputs match the Beam runner's: ``OUT/examples/*.parquet``, ``OUT/dead_letters/*.jsonl`` and,
when training, ``OUT/metrics.jsonl`` + ``metrics.png``. Sinks are exactly once: the join stages
each Example table as a Parquet file and emits its path; the paths are committed (``*.examples``
lines) when a checkpoint completes, and when the job finishes the committed files move into
``examples/`` (``publish_examples``). ``resume`` restarts a killed job from its
newest retained checkpoint (and its model from the newest snapshot in the model directory).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runners.options import JobOptions
from schemas.spec_types import FeatureSpec
from trainer.running import PublishOptions

TRAINER_MAX_PARALLELISM = 128  # of the trainer operator: fixes which key reaches which worker
LONG_BUNDLES_FROM_BATCHES = 8  # a bounded Kafka job of this many decoder batches or more takes long bundles
LONG_JOIN_BUNDLE_RECORDS = 1_000_000  # ... and its join, if it does not train, bundles this long (or 5 s)
DEFAULT_PARALLELISM = 1  # of the join (the trainer is one); 2 is 8-37 % faster on 2 cores (BENCHMARKS.md)


def flink_environment(parallelism: int = DEFAULT_PARALLELISM, checkpoint_dir: str | None = None,
                      checkpoint_every_ms: int = 10_000, restore_from: str | None = None, bundle_size: int = 1_000,
                      bundle_ms: int = 1_000, jars: list[str] | None = None):
    """The StreamExecutionEnvironment: a local mini-cluster, or - inside ``flink run`` - the
    cluster that command submits to. ``restore_from``: a retained checkpoint to start from;
    ``jars``: URIs of connector jars the job needs (``pipeline.jars``)."""
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment

    _jvm_environment()
    config = Configuration()
    config.set_string("python.execution-mode", "process")
    config.set_string("python.executable", sys.executable)
    config.set_string("python.client.executable", sys.executable)
    config.set_string("state.backend.type", "rocksdb")
    # a failing job fails (after a few restarts from its last checkpoint), it does not loop
    config.set_string("restart-strategy.type", "fixed-delay")
    config.set_string("restart-strategy.fixed-delay.attempts", "2")
    config.set_string("restart-strategy.fixed-delay.delay", "1 s")
    # Keyed state goes back to the JVM when a bundle finishes, and a checkpoint barrier waits for
    # the bundle in flight. See ``run_flink_job`` for the sizes.
    config.set_string("python.fn-execution.bundle.size", str(bundle_size))
    config.set_string("python.fn-execution.bundle.time", str(bundle_ms))

    if checkpoint_dir is not None:
        config.set_string("execution.checkpointing.dir", checkpoint_dir)
        config.set_string("execution.checkpointing.interval", f"{checkpoint_every_ms} ms")
        config.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    if restore_from is not None:
        config.set_string("execution.state-recovery.path", restore_from)
    env = StreamExecutionEnvironment.get_execution_environment(config)
    if jars:  # (added to pipeline.jars: under `flink run` that already holds flink-python's jar)
        env.add_jars(*jars)
        # A Kafka job (the only one with jars): records are passed between its chained JVM
        # operators (source, SQL, up to the Python one, which serialises its input: nothing keeps
        # a reference) without a deep copy each
        env.get_config().enable_object_reuse()
    env.set_parallelism(parallelism)
    return env


def _jvm_environment() -> None:
    """Environment variables PyFlink reads when it starts its JVM."""
    # On a local mini-cluster PyFlink runs the Python operators in "loopback" mode by default:
    # as threads of this driver process, all behind its one GIL. A worker process (as on a
    # cluster) lets the join and the trainer run beside the driver and the JVM.
    os.environ.setdefault("_python_worker_execution_mode", "process")
    # The mini-cluster's JVM (started with the first PyFlink call) mostly moves bytes to the Python
    # workers; on a short job its C2 JIT compiler alone took ~5 CPU-s of a 2-core machine. C1 only
    # (~2 s less on 360k events), and the Flink classes from a class-data-sharing archive when this
    # environment has one (``runners.flink_cds``: ~2.5 s less start-up); a user's own JVM_ARGS win.
    if "JVM_ARGS" not in os.environ:  # (finding the archive hashes the class path: ~0.1 s)
        from runners.flink_cds import jvm_options

        os.environ["JVM_ARGS"] = " ".join(["-XX:TieredStopAtLevel=1", *jvm_options()])


def start_jvm_in_background():
    """Start PyFlink's JVM (its gateway: ~2 s) on a thread, so that it boots while the driver
    replays the logs; the first PyFlink call waits for it. Returns the thread."""
    import threading

    from pyflink.java_gateway import get_gateway

    _jvm_environment()
    starting = threading.Thread(target=get_gateway, name="start PyFlink's JVM", daemon=True)
    starting.start()
    return starting


def newest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest completed checkpoint (a ``chk-N`` directory with its ``_metadata``) under
    ``checkpoint_dir``, over every job that wrote there: by the time its ``_metadata`` was
    written, then N. (Not by the directory's time: a checkpoint being discarded after a newer
    one completed has its files deleted - which touches its directory - and a kill can leave it
    with its ``_metadata`` but without its state.)"""
    completed = list(checkpoint_dir.glob("*/chk-*/_metadata"))
    newest = max(completed, key=lambda meta: (meta.stat().st_mtime, int(meta.parent.name[4:])), default=None)
    return None if newest is None else newest.parent


def _file_sink(directory: Path, suffix: str):
    from pyflink.common.serialization import Encoder
    from pyflink.datastream.connectors.file_system import BucketAssigner, FileSink, OutputFileConfig, RollingPolicy

    # a part file per checkpoint: what a completed checkpoint covers becomes visible at once
    return (FileSink.for_row_format(directory.resolve().as_uri(), Encoder.simple_string_encoder())
            .with_bucket_assigner(BucketAssigner.base_path_bucket_assigner())
            .with_rolling_policy(RollingPolicy.on_checkpoint_rolling_policy())
            .with_output_file_config(OutputFileConfig.builder().with_part_prefix("part").with_part_suffix(suffix).build())
            .build())


def publish_examples(directory: Path, staging: Path) -> int:
    """The Examples a completed checkpoint committed -> ``directory``: each line of a committed
    part file (``part-*.examples``) names a Parquet file the join staged, which moves into
    ``directory``; staged files no committed line names (a killed attempt's) and the uncommitted
    parts (hidden ``.part-*``) are removed. Returns the rows published."""
    import pyarrow.parquet as pq

    committed = sorted(directory.glob("part-*.examples"))
    rows = 0
    for path in committed:
        for line in path.read_text().splitlines():
            staged = Path(line)
            rows += pq.read_metadata(staged).num_rows
            staged.replace(directory / staged.name)
    for path in committed + sorted(directory.glob(".part-*")):
        path.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    return rows


@dataclass
class _FlinkRun:
    """What ``_prepare`` set up for one run: its working paths and the source to read."""

    out_dir: Path
    checkpoints: Path  # OUT/.checkpoints: retained checkpoints (``--resume`` restores the newest)
    staging: Path  # OUT/.examples-staged: Example files the join wrote, published at the end
    live_dir: Path  # OUT/.live: announcements of new log files, and the "ended" marker
    spill: Path  # OUT/.replay: the replay's micro-batch files
    kafka_spill: Path  # OUT/.kafka-batches: the Kafka batches' shard files (checkpoints name them)
    timing: Path  # OUT/.timing: the Python operators' busy clocks
    rendezvous: Path  # OUT/.rendezvous: where several trainer workers meet (a file per attempt)
    restore_from: Path | None  # the checkpoint this run restores, if any
    source_path: Path  # a batch list (replay) or the announcements directory (live); unused for Kafka
    step_ms: int  # event time per micro-batch (replay, Kafka window) or per announcement round (live)
    announcer: object | None = None  # pipelines.log_announcer.LogAnnouncer (live)
    read_below: dict | None = None  # a bounded Kafka job: read below these end offsets, then drain
    long_bundles: bool = False  # a large bounded Kafka job: long decoder bundles, the last one ended by a checkpoint

    @property
    def ended_marker(self) -> Path:
        return self.live_dir / "ended"

    @property
    def read_marker(self) -> Path:
        """Written by a bounded Kafka job's decoder once every partition's last record reached it."""
        return self.kafka_spill / "read_to_end"


def run_flink_job(spec: FeatureSpec, options: JobOptions, shards: int = 4) -> dict:
    """Replay (backfill and replay are one on Flink) or live logs through the PyFlink job; returns
    the mode, seconds, dead letters by reason and, with ``train``, the trainer's summary.

    Live: ``pipelines.log_announcer`` announces new log files every ``watch_interval_s`` into
    ``OUT/.live/announced``, a continuously monitored ``FileSource`` reads the announcements, and the
    watermark follows the wall clock (less twice the interval, for announcements read out of
    order). The job runs until ``stop_after_s`` or SIGTERM/SIGINT; then every announced file is
    read and the job is stopped with a draining savepoint (every window closes, the trainer
    trains the rest, the sinks commit).

    ``events_per_step``: events per micro-batch (each split into a record per join-key shard).
    Larger batches mean fewer state round trips between the JVM and the Python worker (measured
    when records still carried rows, 360k synthetic events: 4,096 -> 52 s, 16,384 -> 28 s).
    ``parallelism``: instances of each operator but the trainer and the live reader (None:
    ``DEFAULT_PARALLELISM``). ``resume``: start from the newest retained checkpoint under
    ``OUT/.checkpoints`` (a fresh start if there is none)."""
    started = time.perf_counter()
    start_jvm_in_background()
    run = _prepare(spec, options, shards)
    env = _build(spec, options, run, shards)
    _execute(env, spec, options, run)
    return _summarise(spec, options, run, time.perf_counter() - started)


def _prepare(spec: FeatureSpec, options: JobOptions, shards: int) -> _FlinkRun:
    """Output directories (kept on ``--resume`` from a checkpoint), and the source: the replay's
    micro-batches spilled and listed, or the live announcer."""
    from pipelines.log_announcer import LogAnnouncer
    from runners.replay import OUTPUTS, fresh_output_dirs, replay_batches
    from schemas.dead_letters import DeadLetterSink

    out_dir = Path(options.out)
    # (the source's directory must not be hidden itself: Flink's file filter skips ".name"/"_name")
    run = _FlinkRun(out_dir, checkpoints=out_dir / ".checkpoints", staging=out_dir / ".examples-staged",
                    live_dir=out_dir / ".live", spill=out_dir / ".replay", kafka_spill=out_dir / ".kafka-batches",
                    timing=out_dir / ".timing",
                    rendezvous=out_dir / ".rendezvous",
                    restore_from=newest_checkpoint(out_dir / ".checkpoints") if options.resume else None,
                    source_path=out_dir / ".live" / "announced", step_ms=0)
    if run.restore_from is None:
        # (a resumed job's state names staged and Kafka batch files)
        for stale in (run.checkpoints, run.live_dir, run.staging, run.kafka_spill):
            shutil.rmtree(stale, ignore_errors=True)
        fresh_output_dirs(out_dir, OUTPUTS if options.train else OUTPUTS[:2])
    for stale in (run.spill, run.timing, run.rendezvous):
        shutil.rmtree(stale, ignore_errors=True)
    if options.source is not None:
        from pipelines.flink_kafka import last_batch_marker
        from runners.kafka_source import bounded_extent, bounded_window_ms, resolved_end_offsets

        kafka = options.kafka
        run.kafka_spill.mkdir(exist_ok=True)
        run.read_marker.unlink(missing_ok=True)
        last_batch_marker(run.read_marker).unlink(missing_ok=True)  # (a killed attempt's)
        # the window a restored job's state was made with (its windows, the join's grid)
        chosen, ends = run.kafka_spill / "window_ms", run.kafka_spill / "end_offsets.json"
        if run.restore_from is not None and chosen.is_file():
            run.step_ms = int(chosen.read_text())
            if kafka.bounded:
                run.read_below = {topic: {int(p): o for p, o in parts.items()}
                                  for topic, parts in json.loads(ends.read_text()).items()}
        else:
            # (a bounded job reads below the end offsets, then is drained: see kafka_source.kafka_batches)
            run.read_below = resolved_end_offsets(kafka) if kafka.bounded else None
            extent = bounded_extent(kafka, spec, run.read_below) if kafka.bounded else None
            run.step_ms = (bounded_window_ms(kafka, spec, extent, options.events_per_step)
                           if kafka.bounded and kafka.window_ms is None else kafka.window(spec))
            # A large bounded job: long decoder bundles, its last batch flushed at its end
            # (``kafka_source.kafka_batches``); a small one, or a restored one, the live bundles.
            run.long_bundles = extent is not None and extent.records >= LONG_BUNDLES_FROM_BATCHES * options.events_per_step
            chosen.write_text(str(run.step_ms))
            if kafka.bounded:
                ends.write_text(json.dumps(run.read_below))
        return run
    if options.live:
        run.announcer = LogAnnouncer(Path(options.logs), run.source_path)
        run.ended_marker.unlink(missing_ok=True)
        run.step_ms = max(1, round(options.watch_interval_s * 1000))
        return run
    run.spill.mkdir()
    read_dead = DeadLetterSink(keep=None)
    # the same logs give the same batch files and list: a restored source continues where it was
    batches, run.step_ms, _ = replay_batches(spec, Path(options.logs), run.spill, options.events_per_step,
                                             read_dead, shards=shards)
    run.source_path = run.spill / "batches.tsv"
    run.source_path.write_text("".join("\t".join(map(str, batch)) + "\n" for batch in batches))
    if run.restore_from is None:
        with open(out_dir / "dead_letters" / "read.jsonl", "w") as out:
            out.writelines(letter.to_json() + "\n" for letter in read_dead.letters)
    return run


def _build(spec: FeatureSpec, options: JobOptions, run: _FlinkRun, shards: int):
    """The job graph: source -> (live: read announced logs) -> shard records -> join per shard ->
    Examples and dead letters to files; with ``train``, the trainer and its metrics."""
    from pyflink.common import Duration, Types, WatermarkStrategy
    from pyflink.common.watermark_strategy import TimestampAssigner
    from pyflink.datastream.connectors.file_system import FileSource, StreamFormat

    from pipelines.flink_join import ReadAnnouncedLogs
    from pipelines.flink_records import DEAD_LETTERS, batch_time, shard_record
    from runners.kafka_source import BOUNDED_BUNDLE_MS, LIVE_BUNDLE_MS

    class BatchTime(TimestampAssigner):
        def extract_timestamp(self, value, record_timestamp):
            return batch_time(value)

    live, train, step_ms, timing = options.live, options.train, run.step_ms, str(run.timing)
    kafka = options.kafka
    # Bundles: a join-only job takes up to 1,000 records or 1 s per bundle, so the joiner's state
    # goes back to the JVM about once a second, not after every shard record (360k events: ~24 s
    # -> ~18.5 s); a large bounded Kafka join, where nothing waits on a record, the decoder's long
    # bundles (5 s: the bench's 360k events 62-69k events/s sustained against 54k with 1 s bundles).
    # A training job keeps one record per bundle: the trainer's bundles would hold checkpoint
    # barriers back for as long as they train (the kill test saw no checkpoint complete before
    # training ended).
    long_join_bundles = run.long_bundles and not train
    env = flink_environment(options.parallelism or DEFAULT_PARALLELISM,
                            checkpoint_dir=run.checkpoints.resolve().as_uri(),
                            checkpoint_every_ms=options.checkpoint_every_ms,
                            restore_from=None if run.restore_from is None else run.restore_from.resolve().as_uri(),
                            bundle_size=1 if train else LONG_JOIN_BUNDLE_RECORDS if long_join_bundles else 1_000,
                            bundle_ms=BOUNDED_BUNDLE_MS if long_join_bundles else LIVE_BUNDLE_MS,
                            jars=None if kafka is None else _kafka_jars(options))
    if kafka is not None:
        from pipelines.flink_kafka import EmitDecoded, kafka_decoder
        from runners.kafka_source import kafka_batches

        decoder = kafka_decoder(spec, kafka.topics, shards, str(run.kafka_spill.resolve()), timing, run.read_below,
                                str(run.read_marker.resolve()), options.events_per_step if run.long_bundles else 0)
        read = (kafka_batches(env, spec, kafka, decoder, options.events_per_step, run.read_below,
                              BOUNDED_BUNDLE_MS if run.long_bundles else LIVE_BUNDLE_MS)
                .process(EmitDecoded(), output_type=Types.PICKLED_BYTE_ARRAY())
                .name("Kafka shard records").set_parallelism(1))
        return _join_and_train(env, spec, options, run, shards, read, read.get_side_output(DEAD_LETTERS))
    source = FileSource.for_record_stream_format(StreamFormat.text_line_format(), run.source_path.resolve().as_uri())
    if live:
        source = source.monitor_continuously(Duration.of_millis(step_ms))
        watermarks = WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(2 * step_ms))
    else:
        watermarks = WatermarkStrategy.for_monotonous_timestamps()
    lines = env.from_source(source.build(), WatermarkStrategy.no_watermarks(),
                            "announced log files" if live else "replayed log batches")
    stamped = lines.assign_timestamps_and_watermarks(watermarks.with_timestamp_assigner(BatchTime()))
    if live:
        read = (stamped.key_by(lambda _: 0, key_type=Types.INT())
                .process(ReadAnnouncedLogs(spec, shards, str(run.ended_marker), timing),
                         output_type=Types.PICKLED_BYTE_ARRAY()).name("read logs, split by shard").set_parallelism(1))
        read_dead_letters = read.get_side_output(DEAD_LETTERS)
    else:
        read = stamped.map(shard_record, output_type=Types.PICKLED_BYTE_ARRAY()).name("shard records")
        read_dead_letters = None
    return _join_and_train(env, spec, options, run, shards, read, read_dead_letters, in_order=not live)


def _join_and_train(env, spec: FeatureSpec, options: JobOptions, run: _FlinkRun, shards: int, read,
                    read_dead_letters, in_order: bool = False):
    """Shard records -> join per shard -> Examples and dead letters to files; with ``train``, the
    trainer and its metrics. ``in_order``: each shard's records come in event-time order (a
    replay)."""
    from pyflink.common import Types

    from pipelines.flink_join import JoinShard
    from pipelines.flink_records import DEAD_LETTERS, subtask_keys
    from pipelines.flink_train import TrainStream

    step_ms, timing = run.step_ms, str(run.timing)
    joined = (read.key_by(lambda value: value[0], key_type=Types.INT())
              .process(JoinShard(spec, step_ms, str(run.staging.resolve()), in_order=in_order, timing_dir=timing),
                       output_type=Types.STRING())
              .name("join, sample, features"))
    joined.sink_to(_file_sink(run.out_dir / "examples", ".examples")).name("examples")
    dead_letters = joined.get_side_output(DEAD_LETTERS)
    if read_dead_letters is not None:
        dead_letters = dead_letters.union(read_dead_letters)
    dead_letters.sink_to(_file_sink(run.out_dir / "dead_letters", ".jsonl")).name("dead letters")
    if options.train:
        publishing = None if options.model_dir is None else PublishOptions(
            str(options.model_dir), clock="processing" if options.runs_until_stopped else "event",
            resume=options.resume)
        # One model, trained by `workers` subtasks: each gets a copy of every Example table, keyed
        # to reach exactly that subtask (the keys depend on the operator's max parallelism).
        workers = spec.training.workers
        keys = subtask_keys(workers, TRAINER_MAX_PARALLELISM)
        copies = joined.flat_map(lambda path: [(key, path) for key in keys],
                                 output_type=Types.TUPLE([Types.INT(), Types.STRING()])).name("to trainers")
        metrics = (copies.key_by(lambda copy: copy[0], key_type=Types.INT())
                   .process(TrainStream(spec, step_ms, options.device, options.progress, publishing, timing,
                                        rendezvous_dir=str(run.rendezvous.resolve())),
                            output_type=Types.STRING())
                   .name("train").set_parallelism(workers).set_max_parallelism(TRAINER_MAX_PARALLELISM))
        metrics.sink_to(_file_sink(run.out_dir / "metrics", ".jsonl")).name("metrics").set_parallelism(1)
    return env


def _execute(env, spec: FeatureSpec, options: JobOptions, run: _FlinkRun) -> None:
    """Run the job to its end: a replay ends with its input, a live job on stop (draining)."""
    kind = " (Kafka)" if options.source is not None else ""
    name = f"streamrec {options.command} {spec.name}{kind}{' (live)' if options.runs_until_stopped else ''}"
    savepoints = (run.out_dir / ".savepoints").resolve().as_uri()
    if options.runs_until_stopped:
        _run_live(env.execute_async(name), run.announcer, run.ended_marker, options.watch_interval_s or 1.0,
                  options.stop_after_s, savepoints)
    elif run.read_below is not None:
        from pipelines.flink_kafka import last_batch_marker
        from runners.kafka_source import commit_ends, ends_committed

        kafka, ends, asked, before, flushed = options.kafka, run.read_below, [0.0], [], [0.0]

        def read_to_end() -> bool:
            """Every record below the end offsets read and processed up to the windows still
            open: the decoder's end marks all in, then a checkpoint triggered after them (its
            barrier follows every record) completed - checked every 0.2 s; else, every 2 s (a
            restored job whose marks came before its checkpoint), the group's commits. Draining
            before that checkpoint would process the backlog inside the drain's savepoint, with
            no checkpoint to fall back on. The checkpoint is asked for as the marks are seen
            (``_trigger_checkpoint``), not awaited from the periodic schedule (up to
            ``--checkpoint-every``, 10 s by default, of a job that has nothing left to read).
            While the decoder says the records left fit in one batch (``last_batch_marker``), a
            checkpoint every 0.5 s ends the decoder's bundle, which sends the batch."""
            if (not run.read_marker.exists() and last_batch_marker(run.read_marker).exists()
                    and time.monotonic() - flushed[0] >= 0.5):
                _trigger_checkpoint(client)
                flushed[0] = time.monotonic()
            if run.read_marker.exists():
                if not before:  # the checkpoints triggered before the marks were seen (any state)
                    before.append(set(run.checkpoints.glob("*/chk-*")))
                    _trigger_checkpoint(client)
                if any(done.parent not in before[0] for done in run.checkpoints.glob("*/chk-*/_metadata")):
                    return True
            if time.monotonic() - asked[0] < 2.0:
                return False
            asked[0] = time.monotonic()
            return ends_committed(kafka, spec, ends)

        client = env.execute_async(name)
        _run_live(client, None, run.ended_marker, 0.2, None, savepoints, until=read_to_end)
        commit_ends(kafka, spec, ends)
    else:
        env.execute(name)


def _summarise(spec: FeatureSpec, options: JobOptions, run: _FlinkRun, elapsed: float) -> dict:
    """Publish the staged Examples, remove the run's working files, and count what it made."""
    from pipelines.busy_clock import read_busy_clocks
    from runners.replay import count_dead_letters, finish_metrics

    python_busy_s = read_busy_clocks(run.timing)
    for done in (run.spill, run.kafka_spill, run.checkpoints, run.timing, run.live_dir, run.rendezvous,
                 run.out_dir / ".savepoints"):
        shutil.rmtree(done, ignore_errors=True)  # (nothing left to restore)
    publish_examples(run.out_dir / "examples", run.staging)
    summary = finish_metrics(spec, run.out_dir) if options.train else {}
    mode = "flink" + (" kafka" if options.source is not None else "") + (" live" if options.runs_until_stopped else "")
    summary.update({"mode": mode, "seconds": round(elapsed, 2),
                    "dead_letters": count_dead_letters(run.out_dir),
                    "restored_from_checkpoint": None if run.restore_from is None else run.restore_from.name,
                    "python_busy_s": python_busy_s})
    return summary


def _run_live(client, announcer, ended_marker: Path, interval_s: float, stop_after_s: float | None,
              savepoint_dir: str, end_timeout_s: float = 300.0, until=None) -> None:
    """Announce new logs every ``interval_s`` while the submitted job runs, until ``stop_after_s``
    (None: until SIGTERM/SIGINT); then announce the end, wait until the job has read every
    announcement, and stop it with a draining savepoint. A job that fails raises its error.
    Without an ``announcer`` (a live Kafka source) the job is only watched, then drained; so is
    one whose ``until()`` turns true (a bounded Kafka job whose group committed its end offsets)."""
    import signal
    import threading

    stop = threading.Event()
    handlers = {}

    def stop_gracefully(*_):  # the first SIGTERM/SIGINT drains; a second one acts as usual
        stop.set()
        for number, handler in handlers.items():
            signal.signal(number, handler)

    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, signal.SIGINT):
            handlers[number] = signal.signal(number, stop_gracefully)
    announcing = None if announcer is None else threading.Thread(
        target=announcer.run, args=(interval_s, stop), name="log announcer", daemon=True)
    if announcing is not None:
        announcing.start()
    try:
        deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
        while not stop.wait(min(interval_s, 1.0)):
            _raise_if_ended(client)
            if (deadline is not None and time.monotonic() >= deadline) or (until is not None and until()):
                stop.set()
        if announcing is not None:
            announcing.join()
            announcer.end()
        deadline = time.monotonic() + end_timeout_s
        while announcing is not None and not ended_marker.exists():
            _raise_if_ended(client)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the live job had not read its announced logs after {end_timeout_s:.0f} s")
            time.sleep(0.1)
        _stop_draining(client, savepoint_dir)
        client.get_job_execution_result().result()
    finally:
        stop.set()
        for number, handler in handlers.items():
            signal.signal(number, handler)


def _kafka_jars(options: JobOptions) -> list[str]:
    from runners.kafka_source import connector_jar_uris

    return connector_jar_uris(options.kafka_jars)


def _stop_draining(client, savepoint_dir: str, timeout_s: float = 120.0) -> str:
    """``flink stop --drain``: a savepoint, MAX_WATERMARK first (every window closes and the sinks
    commit). PyFlink's ``JobClient.stop_with_savepoint`` misses Flink 2's format argument. A job
    stopped before all its tasks run (a bounded Kafka job with nothing left to read) declines the
    savepoint ("... is not being executed at the moment"): asked again every 0.5 s."""
    from pyflink.common.completable_future import CompletableFuture
    from pyflink.java_gateway import get_gateway

    format_type = get_gateway().jvm.org.apache.flink.core.execution.SavepointFormatType.DEFAULT
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return CompletableFuture(client._j_job_client.stopWithSavepoint(True, savepoint_dir, format_type),
                                     str).result()
        except Exception as exc:  # noqa: BLE001 (a Py4J error: only the not-yet-running case is retried)
            if "is not being executed at the moment" not in str(exc) or time.monotonic() > deadline:
                raise
            _raise_if_ended(client)
            time.sleep(0.5)


def _trigger_checkpoint(client, timeout_s: float = 30.0) -> bool:
    """Take a checkpoint of the submitted job now (Flink's ``flink checkpoint JOB``), through the
    local mini-cluster or the cluster client of a job submitted to a cluster, and wait for it.
    PyFlink's ``JobClient`` has no such call, so the Java one's cluster is reached by
    reflection; False (the periodic checkpoints still come) where that fails."""
    from pyflink.java_gateway import get_gateway

    jvm = get_gateway().jvm
    cluster = None
    try:
        java_client = client._j_job_client
        job_id = java_client.getJobID()
        holder = java_client.getClass()
        local = "miniCluster" in {field.getName() for field in holder.getDeclaredFields()}
        field = holder.getDeclaredField("miniCluster" if local else "clusterClientProvider")
        field.setAccessible(True)
        if local:
            done = field.get(java_client).triggerCheckpoint(job_id)
        else:
            cluster = field.get(java_client).getClusterClient()
            done = cluster.triggerCheckpoint(job_id, jvm.org.apache.flink.core.execution.CheckpointType.DEFAULT)
        done.get(int(timeout_s), jvm.java.util.concurrent.TimeUnit.SECONDS)
        return True
    except Exception:  # noqa: BLE001 (a Py4J error: another Flink or client kind, a declined checkpoint)
        return False
    finally:
        if cluster is not None:
            cluster.close()


def _raise_if_ended(client) -> None:
    status = client.get_job_status().result()
    if status.is_globally_terminal_state():
        client.get_job_execution_result().result()  # raises the job's failure
        raise RuntimeError(f"the live job ended early ({status.name})")


def submit(master: str, argv: list[str]) -> int:
    """Run ``streamrec ARGV`` through the wheel's ``flink run`` against the standalone cluster at
    ``master`` (HOST:PORT of its REST endpoint); the job's Python workers use this interpreter.
    Paths in ``argv`` must be absolute and visible to the cluster's TaskManagers."""
    import subprocess

    from runners.flink_cluster import flink_home

    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--flink-master must be HOST:PORT of the cluster's REST endpoint, got {master!r}")
    home = flink_home()
    command = ["bash", str(home / "bin" / "flink"), "run", "-m", master, "-pyexec", sys.executable,
               "-pyclientexec", sys.executable, "-pym", "runners.cli", *argv]
    env = {**os.environ, "FLINK_HOME": str(home)}
    env.setdefault("FLINK_LOG_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "streamrec-flink-client-log"))
    return subprocess.run(command, env=env).returncode
