"""Examples of a whole log directory, joined without an engine: the logs read as Arrow tables,
joined in event-time micro-batches (``transforms.batch_join.join_tables``), sampled and
feature-extracted - the decisions of the jobs' backfill, in one process. For tests, benchmarks
and experiments that need Examples, not a job."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa

from event_datasets.synthetic import SyntheticConfig, generate
from schemas.dead_letters import DeadLetterSink
from schemas.events import load_schema
from schemas.logs import read_log_tables
from schemas.spec_types import FeatureSpec
from transforms.batch_join import join_tables
from transforms.examples import ExampleBuilder
from transforms.join import JoinConfig


def read_events(spec: FeatureSpec, log_dir: str | Path,
                dead_letters: DeadLetterSink | None = None) -> tuple[pa.Table, pa.Table]:
    """(impressions, actions) of a log directory as Arrow tables, file after file (bad records
    to ``dead_letters``, or dropped into a throwaway sink)."""
    sink = dead_letters if dead_letters is not None else DeadLetterSink()
    return tuple(read_log_tables(log_dir, kind, load_schema(schema), sink, spec.events.time_range_ms)
                 for kind, schema in (("impressions", spec.events.impression), ("actions", spec.events.action)))


def examples_from_logs(spec: FeatureSpec, log_dir: str | Path) -> pa.Table:
    """Joined, sampled, feature-extracted Examples of a log directory, in impression-time order."""
    builder = ExampleBuilder(spec)
    batches = join_tables(JoinConfig.from_spec(spec), *read_events(spec, log_dir))
    ordered = next(batches)
    return pa.concat_tables([builder.build_closed(ordered, closed)[0] for closed, _ in batches]) \
        .sort_by("impression_time_ms")


def synthetic_examples(spec: FeatureSpec, impressions: int, seed: int = 5, span_hours: float = 2) -> pa.Table:
    """The Examples of a synthetic stream of ``impressions`` (generated into a temporary log
    directory, then ``examples_from_logs``)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), SyntheticConfig(events=impressions, seed=seed, span_hours=span_hours))
        return examples_from_logs(spec, Path(tmp))
