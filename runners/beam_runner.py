"""Runs the join job on Beam's DirectRunner (the embedded default): backfill or streaming replay.

* backfill (batch): log files are read as Arrow tables, split into join-key shards, and each
  shard is joined in event-time micro-batches by the columnar join (``transforms.batch_join``),
  sampled and feature-extracted - the same decisions as the streaming path, in bulk;
* streaming: the logs are replayed in event-time order as micro-batches through a
  ``TestStream`` on the streaming DirectRunner, the watermark advancing with the events; a
  stateful DoFn per join-key shard holds the columnar join in Beam state with one event-time
  timer, so windows close, late and orphan actions are judged and state is freed while the
  stream runs - as in a live job.

Every mode writes ``OUT/examples/*.parquet`` (Example schema) and ``OUT/dead_letters/*.jsonl``.
With ``train``, the Example tables also go through ``pipelines.beam_train.TrainExamples`` (the
online trainer as a stateful transform): progressive metrics per event-time window land in
``OUT/metrics.jsonl`` with a plot ``OUT/metrics.png``, and the summary holds the final figures.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.utils.timestamp import Timestamp

from pipelines.beam_io import DEAD, WatchLogDirectory, WriteBundles, log_file_names
from pipelines.beam_join import BackfillJoin, StreamingJoin
from pipelines.beam_train import SUMMARY, TrainExamples, release_trainers
from runners.options import JobOptions, Mode
from runners.replay import (
    OUTPUTS,
    count_dead_letters,
    finish_metrics,
    fresh_output_dirs,
    load_replay_batch,
    replay_batches,
)
from schemas.dead_letters import DeadLetterSink
from schemas.spec_types import FeatureSpec
from trainer.running import PublishOptions


def replay_stream(spec: FeatureSpec, log_dir: str | Path, spill_dir: Path, events_per_step: int = 4_096,
                  dead_letters: DeadLetterSink | None = None) -> tuple[TestStream, int]:
    """The replay's micro-batches as a TestStream, and the median event-time span of a step (ms).
    After each batch the watermark advances to the next batch's first event time (nothing
    earlier follows); after the last, to the last event time plus the join window and one more
    step (so every window closes in event-time order), then to infinity.

    The stream carries the spilled files' paths (a TestStream's payload is pickled and
    compressed at pipeline construction, so data must not ride in it). Each advance is a round
    of the DirectRunner: steps count events."""
    batches, step_ms, last_event_ms = replay_batches(spec, log_dir, spill_dir, events_per_step, dead_letters)
    stream = TestStream()
    for index, (first, impressions_path, actions_path) in enumerate(batches):
        stream.add_elements([beam.window.TimestampedValue((impressions_path, actions_path),
                                                          Timestamp(micros=first * 1000))])
        if index + 1 < len(batches):
            stream.advance_watermark_to(Timestamp(micros=batches[index + 1][0] * 1000))
    if last_event_ms is not None:
        stream.advance_watermark_to(Timestamp(micros=(last_event_ms + spec.join.window_ms + step_ms + 1) * 1000))
    return stream.advance_watermark_to_infinity(), step_ms


def run_job(spec: FeatureSpec, options: JobOptions) -> dict:
    """The job on the DirectRunner in the options' mode: backfill, streaming replay, or live
    (watch the log directory for new files, until ``stop_after_s`` if given); join, sample and
    extract features, and with ``train`` train online on the Examples, publishing to
    ``model_dir`` if given (``resume``: from its newest snapshot). Returns the summary."""
    _prepare(options)
    pipeline_options = PipelineOptions(flags=[], runner="DirectRunner")  # (flags=None would parse our sys.argv)
    pipeline_options.view_as(StandardOptions).streaming = options.streaming
    started = time.perf_counter()
    with beam.Pipeline(options=pipeline_options) as pipeline:  # (executed when the block ends)
        _build(pipeline, spec, options)
    return _summarise(spec, options, time.perf_counter() - started)


def _prepare(options: JobOptions) -> None:
    if options.resume and options.model_dir is None:
        raise ValueError("--resume needs --model-dir (the snapshots to resume from)")
    fresh_output_dirs(Path(options.out), OUTPUTS if options.train else OUTPUTS[:2])


def _build(pipeline, spec: FeatureSpec, options: JobOptions) -> None:
    """The job graph: the join of the options' mode -> Examples and dead letters to files; with
    ``train``, the trainer and its metrics."""
    out_dir = Path(options.out)
    result, dead = _join_graph(pipeline, spec, options)
    result["examples"] | "WriteExamples" >> beam.ParDo(WriteBundles(str(out_dir / "examples"), "examples"))
    dead | "WriteDeadLetters" >> beam.ParDo(WriteBundles(str(out_dir / "dead_letters"), "dead_letters"))
    if options.train:
        publishing = None if options.model_dir is None else PublishOptions(
            str(options.model_dir), clock="processing" if options.live else "event", resume=options.resume)
        trained = result["examples"] | "Train" >> TrainExamples(
            spec, options.device, at_end=not options.streaming, progress=options.progress, publishing=publishing)
        final = trained[SUMMARY] | "MarkFinal" >> beam.Map(lambda summary: {**summary, "final": True})
        ((trained["metrics"], final) | "AllMetrics" >> beam.Flatten()
         | "WriteMetrics" >> beam.ParDo(WriteBundles(str(out_dir / "metrics"), "metrics")))


def _summarise(spec: FeatureSpec, options: JobOptions, elapsed: float) -> dict:
    out_dir = Path(options.out)
    release_trainers()
    shutil.rmtree(out_dir / ".replay", ignore_errors=True)
    dead_counts = count_dead_letters(out_dir)  # (streaming replay: the letters read before the pipeline too)
    summary = finish_metrics(spec, out_dir) if options.train else {}
    mode = {Mode.LIVE: "live", Mode.REPLAY: "streaming", Mode.BACKFILL: "backfill"}[options.mode]
    summary.update({"mode": mode, "seconds": round(elapsed, 2), "dead_letters": dead_counts})
    return summary


def _join_graph(pipeline, spec: FeatureSpec, options: JobOptions):
    """The join stage of the options' mode: (its outputs, all its dead letters)."""
    if options.live:
        live = pipeline | "WatchLogs" >> WatchLogDirectory(spec, str(options.logs), options.watch_interval_s,
                                                          options.stop_after_s)
        result = live["batches"] | "StreamingJoin" >> StreamingJoin(spec)
        return result, (live[DEAD], result[DEAD]) | "AllDeadLetters" >> beam.Flatten()
    if options.mode is Mode.REPLAY:
        spill_dir = Path(options.out) / ".replay"
        shutil.rmtree(spill_dir, ignore_errors=True)
        spill_dir.mkdir()
        read_dead = DeadLetterSink(keep=None)
        replay, step_ms = replay_stream(spec, options.logs, spill_dir, dead_letters=read_dead)
        batches = pipeline | "ReplayLogs" >> replay | "LoadBatches" >> beam.Map(load_replay_batch)
        read_dead_letters = pipeline | "ReadDeadLetters" >> beam.Create(read_dead.letters)
        # windows close at most once per replay step: a step spans step_ms of event time
        result = batches | "StreamingJoin" >> StreamingJoin(spec, emit_every_ms=step_ms)
        return result, (read_dead_letters, result[DEAD]) | "AllDeadLetters" >> beam.Flatten()
    result = pipeline | "Backfill" >> BackfillJoin(spec, *log_file_names(options.logs))
    return result, result[DEAD]
