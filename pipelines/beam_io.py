"""What every Beam pipeline of the job shares: the dead-letter output with its counters, log
files in (a listing for backfill, a directory watch for live) and bundles written out.

Dead letters of every stage leave on the ``dead_letters`` output with their reason; a
``Metrics`` counter per stage and reason counts them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import Timestamp

from schemas.dead_letters import DeadLetter, DeadLetterSink
from schemas.events import load_schema
from schemas.logs import read_event_file
from schemas.spec_types import FeatureSpec

DEAD = "dead_letters"
NAMESPACE = "streamrec"


def dead_letter_outputs(letters: Iterable[DeadLetter]):
    """Count each dead letter by stage and reason, and send it to the ``dead_letters`` output."""
    for letter in letters:
        Metrics.counter(NAMESPACE, f"dead_letters.{letter.stage}.{letter.reason}").inc()
        yield beam.pvalue.TaggedOutput(DEAD, letter)


def log_file_names(log_dir: str | Path) -> tuple[list[str], list[str]]:
    from schemas.logs import log_files

    return ([str(p) for p in log_files(log_dir, "impressions")], [str(p) for p in log_files(log_dir, "actions")])


class WriteBundles(beam.DoFn):
    """Writes each bundle's elements to one new file under ``directory`` (atomic rename).

    Works the same in batch and streaming (no windowed file sink needed): examples (records or
    Arrow tables) go to Parquet in the Example schema, dead letters and dicts (metric rows) to
    JSON lines.
    """

    def __init__(self, directory: str, kind: str):
        self.directory, self.kind = directory, kind

    def start_bundle(self):
        self.buffer = []

    def process(self, element):
        self.buffer.append(element)
        return []

    def finish_bundle(self):
        if not self.buffer:
            return
        import uuid

        import pyarrow as pa
        import pyarrow.parquet as pq

        from schemas.files import atomic_write
        from transforms.examples import EXAMPLE_SCHEMA

        name = f"part-{uuid.uuid4().hex}"
        if self.kind == "examples":
            tables = [t for t in self.buffer if isinstance(t, pa.Table)]
            rows = [r for r in self.buffer if not isinstance(r, pa.Table)]
            table = pa.concat_tables(tables + ([pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)] if rows else []))
            with atomic_write(Path(self.directory) / f"{name}.parquet") as out:
                pq.write_table(table, out)
        else:
            with atomic_write(Path(self.directory) / f"{name}.jsonl", "w") as out:
                out.writelines((item.to_json() if hasattr(item, "to_json") else json.dumps(item)) + "\n"
                               for item in self.buffer)
        self.buffer = []


class LoadLogFile(beam.DoFn):
    """("impressions" | "actions", path) -> (impressions table, actions table) micro-batch."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec

    def setup(self):
        self.schemas = {"impressions": load_schema(self.spec.events.impression),
                        "actions": load_schema(self.spec.events.action)}

    def process(self, element):
        kind, path = element
        sink = DeadLetterSink(keep=None)
        yield read_event_file(path, kind, self.schemas, sink, self.spec.events.time_range_ms)
        yield from dead_letter_outputs(sink.letters)


class WatchLogDirectory(beam.PTransform):
    """Live input: new files under LOGS/impressions and LOGS/actions become micro-batches.

    Files are matched every ``interval_s`` seconds (``fileio.MatchContinuously``), so the
    watermark follows processing time: meant for live logs whose event times are near now (a
    replay of old logs belongs to ``streamrec backfill`` or ``join --streaming``). Writers must
    create files atomically (temporary name, then rename), as ``schemas.logs`` does.
    """

    def __init__(self, spec: FeatureSpec, log_dir: str, interval_s: float, stop_after_s: float | None):
        super().__init__()
        self.spec, self.log_dir, self.interval_s, self.stop_after_s = spec, log_dir, interval_s, stop_after_s

    def expand(self, pbegin):
        from apache_beam.io.fileio import MatchContinuously
        from apache_beam.utils.timestamp import MAX_TIMESTAMP

        start = Timestamp.now()
        stop = MAX_TIMESTAMP if self.stop_after_s is None else start + self.stop_after_s
        matched = []
        for kind in ("impressions", "actions"):
            for extension in ("avro", "parquet"):
                pattern = str(Path(self.log_dir) / kind / f"*.{extension}")
                matched.append(pbegin | f"Watch{kind}{extension}" >> MatchContinuously(
                    pattern, interval=self.interval_s, start_timestamp=start, stop_timestamp=stop)
                    | f"Tag{kind}{extension}" >> beam.Map(lambda meta, kind=kind: (kind, meta.path)))
        loaded = (matched | "NewFiles" >> beam.Flatten()
                  | "LoadFiles" >> beam.ParDo(LoadLogFile(self.spec)).with_outputs(DEAD, main="batches"))
        return {"batches": loaded.batches, DEAD: loaded[DEAD]}
