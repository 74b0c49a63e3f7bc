"""Runs the join job on Beam's DirectRunner (the embedded default): backfill or streaming replay.

* backfill (batch): log files are read as Arrow tables, split into join-key shards, and each
  shard is joined in event-time micro-batches by the columnar join (``transforms.batch_join``),
  sampled and feature-extracted - the same decisions as the streaming path, in bulk;
* streaming: the logs are replayed in event-time order through a ``TestStream`` on the
  streaming DirectRunner, the watermark advancing with the events, so windows close, late and
  orphan actions are judged, and state is freed while the stream runs - as in a live job.

Both write ``OUT/examples/*.parquet`` (Example schema), ``OUT/dead_letters/*.jsonl`` and
return a summary with the counts.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.utils.timestamp import Timestamp

from pipelines.beam_join import DEAD, NAMESPACE, BackfillJoin, JoinSampleExtract, WriteBundles, log_file_names
from schemas.dead_letters import DeadLetterSink
from schemas.events import load_schema
from schemas.logs import read_log
from schemas.spec import FeatureSpec


def replay_stream(spec: FeatureSpec, log_dir: str | Path, events_per_step: int = 2_000,
                  dead_letters: DeadLetterSink | None = None) -> TestStream:
    """The logs as a TestStream in event-time order; every ``events_per_step`` events the watermark
    advances to the next event's time (nothing earlier follows). Each advance is a round of the
    DirectRunner, so steps are counted in events, not in event time.
    """
    events = [("impression", r) for r in read_log(log_dir, "impressions", load_schema(spec.events.impression),
                                                  dead_letters)]
    events += [("action", r) for r in read_log(log_dir, "actions", load_schema(spec.events.action), dead_letters)]
    events.sort(key=lambda event: event[1]["event_time_ms"])
    stream = TestStream()
    for start in range(0, len(events), events_per_step):
        chunk = events[start:start + events_per_step]
        stream.add_elements([beam.window.TimestampedValue(e, Timestamp(micros=e[1]["event_time_ms"] * 1000))
                             for e in chunk])
        if start + events_per_step < len(events):
            stream.advance_watermark_to(Timestamp(micros=events[start + events_per_step][1]["event_time_ms"] * 1000))
    return stream.advance_watermark_to_infinity()


def run_join(spec: FeatureSpec, log_dir: str | Path, out_dir: str | Path, streaming: bool = False) -> dict:
    out_dir = Path(out_dir)
    for sub in ("examples", "dead_letters"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / sub).mkdir(parents=True)
    options = PipelineOptions(runner="DirectRunner")
    options.view_as(StandardOptions).streaming = streaming
    read_dead = DeadLetterSink(keep=None)
    started = time.perf_counter()
    with beam.Pipeline(options=options) as pipeline:
        if streaming:
            events = pipeline | "ReplayLogs" >> replay_stream(spec, log_dir, dead_letters=read_dead)
            read_dead_letters = pipeline | "ReadDeadLetters" >> beam.Create(read_dead.letters)
            result = events | "JoinSampleExtract" >> JoinSampleExtract(spec)
            dead = (read_dead_letters, result[DEAD]) | "AllDeadLetters" >> beam.Flatten()
        else:
            result = pipeline | "Backfill" >> BackfillJoin(spec, *log_file_names(log_dir))
            dead = result[DEAD]
        result["examples"] | "WriteExamples" >> beam.ParDo(WriteBundles(str(out_dir / "examples"), "examples"))
        dead | "WriteDeadLetters" >> beam.ParDo(WriteBundles(str(out_dir / "dead_letters"), "dead_letters"))
    elapsed = time.perf_counter() - started
    counters = pipeline.result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    dead_counts: dict[str, int] = {}
    for counter in counters:
        reason = counter.key.metric.name.split(".")[-1]
        dead_counts[reason] = dead_counts.get(reason, 0) + counter.committed
    for letter in read_dead.letters:  # read before the pipeline in streaming replay
        dead_counts[letter.reason] = dead_counts.get(letter.reason, 0) + 1
    return {"mode": "streaming" if streaming else "backfill", "seconds": round(elapsed, 2),
            "dead_letters": dead_counts}
