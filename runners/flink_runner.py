"""Runs the job on PyFlink: a local mini-cluster by default, a standalone cluster on request.

The logs are replayed in event-time order as micro-batches (spilled to Arrow IPC files, as the
Beam replay does; a batch-list file is the checkpointed source) and flow through
``pipelines.flink_join`` and, when training, ``pipelines.flink_train``. Python operators run in
process mode (torch must not run in thread mode); state lives in RocksDB and checkpoints go to
``OUT/.checkpoints`` every ``checkpoint_every_ms``, retained when the job dies.

Outputs match the Beam runner's: ``OUT/examples/*.parquet``, ``OUT/dead_letters/*.jsonl`` and,
when training, ``OUT/metrics.jsonl`` + ``metrics.png``. Sinks are exactly once: Example tables
are committed as base64 Arrow IPC lines (``*.examples``) when a checkpoint completes and, when
the job finishes, compacted into one Parquet file. ``resume`` restarts a killed job from its
newest retained checkpoint (and its model from the newest snapshot in the model directory).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from schemas.spec import FeatureSpec
from trainer.running import Publishing


def flink_environment(parallelism: int = 1, checkpoint_dir: str | None = None, checkpoint_every_ms: int = 10_000,
                      restore_from: str | None = None):
    """The StreamExecutionEnvironment: a local mini-cluster, or - inside ``flink run`` - the
    cluster that command submits to. ``restore_from``: a retained checkpoint to start from."""
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment

    # On a local mini-cluster PyFlink runs the Python operators in "loopback" mode by default:
    # as threads of this driver process, all behind its one GIL. Separate worker processes (one
    # per Python operator chain, as on a cluster) let the split, join and trainer run in parallel.
    os.environ.setdefault("_python_worker_execution_mode", "process")
    config = Configuration()
    config.set_string("python.execution-mode", "process")
    config.set_string("python.executable", sys.executable)
    config.set_string("python.client.executable", sys.executable)
    config.set_string("state.backend.type", "rocksdb")
    # a failing job fails (after a few restarts from its last checkpoint), it does not loop
    config.set_string("restart-strategy.type", "fixed-delay")
    config.set_string("restart-strategy.fixed-delay.attempts", "2")
    config.set_string("restart-strategy.fixed-delay.delay", "1 s")
    config.set_string("python.fn-execution.bundle.size", "1")  # batches are already large records

    if checkpoint_dir is not None:
        config.set_string("execution.checkpointing.dir", checkpoint_dir)
        config.set_string("execution.checkpointing.interval", f"{checkpoint_every_ms} ms")
        config.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    if restore_from is not None:
        config.set_string("execution.state-recovery.path", restore_from)
    env = StreamExecutionEnvironment.get_execution_environment(config)
    env.set_parallelism(parallelism)
    return env


def newest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest completed checkpoint (a ``chk-N`` directory with its ``_metadata``) under
    ``checkpoint_dir``, over every job that wrote there."""
    completed = [meta.parent for meta in checkpoint_dir.glob("*/chk-*/_metadata")]
    return max(completed, key=lambda chk: chk.stat().st_mtime, default=None)


def _file_sink(directory: Path, suffix: str):
    from pyflink.common.serialization import Encoder
    from pyflink.datastream.connectors.file_system import BucketAssigner, FileSink, OutputFileConfig, RollingPolicy

    # a part file per checkpoint: what a completed checkpoint covers becomes visible at once
    return (FileSink.for_row_format(directory.resolve().as_uri(), Encoder.simple_string_encoder())
            .with_bucket_assigner(BucketAssigner.base_path_bucket_assigner())
            .with_rolling_policy(RollingPolicy.on_checkpoint_rolling_policy())
            .with_output_file_config(OutputFileConfig.builder().with_part_prefix("part").with_part_suffix(suffix).build())
            .build())


def compact_examples(directory: Path) -> int:
    """The committed Example lines (``*.examples``) -> one ``examples.parquet``; returns its rows.
    Uncommitted leftovers of a killed attempt (hidden ``.part-*`` files) are removed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.flink_join import decode_table
    from schemas.logs import atomic_write

    committed = sorted(directory.glob("part-*.examples"))
    tables = [decode_table(line) for path in committed for line in path.read_text().splitlines() if line]
    rows = 0
    if tables:
        table = pa.concat_tables(tables)
        with atomic_write(directory / "examples.parquet") as out:
            pq.write_table(table, out)
        rows = table.num_rows
    for path in committed + sorted(directory.glob(".part-*")):
        path.unlink()
    return rows


def run_flink_job(spec: FeatureSpec, log_dir: str | Path, out_dir: str | Path, train: bool = False,
                  device: str = "cpu", progress: bool = True, model_dir: str | Path | None = None,
                  resume: bool = False, shards: int = 4, parallelism: int = 1, events_per_step: int = 16_384,
                  checkpoint_every_ms: int = 10_000) -> dict:
    """Backfill/replay through the PyFlink job; returns the mode, seconds, dead letters by reason
    and, with ``train``, the trainer's summary.

    ``events_per_step``: events per micro-batch. Larger batches mean fewer state round trips
    between the JVM and the Python worker (on 360k synthetic events: 4,096 -> 52 s, 16,384 -> 28 s,
    of which ~10 s are the mini-cluster's start and stop). ``resume``: start from the newest
    retained checkpoint under ``OUT/.checkpoints`` (a fresh start if there is none)."""
    import json

    from pyflink.common import Types, WatermarkStrategy
    from pyflink.common.watermark_strategy import TimestampAssigner
    from pyflink.datastream.connectors.file_system import FileSource, StreamFormat

    from pipelines.flink_join import DEAD_LETTERS, JoinShard, SplitBatch, batch_time, read_busy_clocks
    from pipelines.flink_train import TrainStream
    from runners.beam_runner import OUTPUTS, _finish_metrics, fresh_output_dirs, replay_batches
    from schemas.dead_letters import DeadLetterSink

    out_dir = Path(out_dir)
    checkpoints = out_dir / ".checkpoints"
    restore_from = newest_checkpoint(checkpoints) if resume else None
    if restore_from is None:
        shutil.rmtree(checkpoints, ignore_errors=True)
        fresh_output_dirs(out_dir, OUTPUTS if train else OUTPUTS[:2])
    spill = out_dir / ".replay"
    shutil.rmtree(spill, ignore_errors=True)
    spill.mkdir()
    read_dead = DeadLetterSink(keep=None)
    # the same logs give the same batch files and list: a restored source continues where it was
    batches, step_ms, _ = replay_batches(spec, log_dir, spill, events_per_step, read_dead)
    batch_list = spill / "batches.tsv"
    batch_list.write_text("".join(f"{first}\t{imp}\t{act}\n" for first, imp, act in batches))
    if restore_from is None:
        with open(out_dir / "dead_letters" / "read.jsonl", "w") as out:
            out.writelines(letter.to_json() + "\n" for letter in read_dead.letters)

    class BatchTime(TimestampAssigner):
        def extract_timestamp(self, value, record_timestamp):
            return batch_time(value)

    started = time.perf_counter()
    env = flink_environment(parallelism, checkpoint_dir=checkpoints.resolve().as_uri(),
                            checkpoint_every_ms=checkpoint_every_ms,
                            restore_from=None if restore_from is None else restore_from.resolve().as_uri())
    source = FileSource.for_record_stream_format(StreamFormat.text_line_format(), batch_list.resolve().as_uri()).build()
    lines = env.from_source(source, WatermarkStrategy.no_watermarks(), "replayed log batches")
    stamped = lines.assign_timestamps_and_watermarks(
        WatermarkStrategy.for_monotonous_timestamps().with_timestamp_assigner(BatchTime()))
    timing = out_dir / ".timing"
    shutil.rmtree(timing, ignore_errors=True)
    joined = (stamped.flat_map(SplitBatch(shards, str(timing)), output_type=Types.PICKLED_BYTE_ARRAY()).name("split by shard")
              .key_by(lambda value: value[0], key_type=Types.INT())
              .process(JoinShard(spec, step_ms, str(timing)), output_type=Types.STRING()).name("join, sample, features"))
    joined.sink_to(_file_sink(out_dir / "examples", ".examples")).name("examples")
    joined.get_side_output(DEAD_LETTERS).sink_to(_file_sink(out_dir / "dead_letters", ".jsonl")).name("dead letters")
    if train:
        publishing = None if model_dir is None else Publishing(str(model_dir), clock="event", resume=resume)
        metrics = (joined.key_by(lambda _: 0, key_type=Types.INT())
                   .process(TrainStream(spec, step_ms, device, progress, publishing, str(timing)),
                            output_type=Types.STRING()).name("train").set_parallelism(1))  # one model
        metrics.sink_to(_file_sink(out_dir / "metrics", ".jsonl")).name("metrics").set_parallelism(1)
    env.execute(f"streamrec {'run' if train else 'join'} {spec.name}")
    elapsed = time.perf_counter() - started
    python_busy_s = read_busy_clocks(timing)
    for done in (spill, checkpoints, timing):  # a finished job has nothing to restore
        shutil.rmtree(done, ignore_errors=True)
    compact_examples(out_dir / "examples")
    counts: dict[str, int] = {}
    for part in (out_dir / "dead_letters").glob("*.jsonl"):
        for line in part.read_text().splitlines():
            reason = json.loads(line)["reason"]
            counts[reason] = counts.get(reason, 0) + 1
    summary = _finish_metrics(spec, out_dir) if train else {}
    summary.update({"mode": "flink", "seconds": round(elapsed, 2), "dead_letters": counts,
                    "restored_from_checkpoint": None if restore_from is None else restore_from.name,
                    "python_busy_s": python_busy_s})
    return summary


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
