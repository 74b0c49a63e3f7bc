"""Log replay for the streaming jobs, free of engine imports (Beam and Flink runners share it).

The logs are read once, sorted by event time and cut into micro-batches of ``events_per_step``
events, each spilled as two Arrow IPC files (impressions, actions); a runner streams the batch
list (Beam: a ``TestStream``; Flink: a ``FileSource`` over a batch-list file). Also the output
directory layout both runners write and the merge of the trainer's metric parts.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from pipelines.tables import load_spilled, spill_shards, spill_table
from schemas.dead_letters import DeadLetterSink
from schemas.durations import format_duration_ms
from schemas.spec_types import FeatureSpec
from transforms.log_examples import read_events


def load_replay_batch(paths: tuple[str, str]) -> tuple[pa.Table, pa.Table]:
    """(impressions, actions) of one spilled micro-batch."""
    return tuple(load_spilled(path) for path in paths)


class Replay(NamedTuple):
    batches: list[tuple]  # (first event time ms, impressions file, actions file) or, by shard,
    #                       (first event time ms, shard, impressions file, actions file)
    step_ms: int  # median event-time span of a batch
    last_event_ms: int | None  # None for empty logs


def replay_batches(spec: FeatureSpec, log_dir: str | Path, spill_dir: Path, events_per_step: int = 4_096,
                   dead_letters: DeadLetterSink | None = None, shards: int | None = None) -> Replay:
    """The logs as micro-batches in event-time order, spilled as Arrow IPC under ``spill_dir``:
    each batch holds the events from its first event time up to the next batch's.

    ``shards``: each batch is spilled as one pair of files per join-key shard it touches
    (``transforms.batch_join.split_batch_by_shard``), in shard order - the Flink job's records then
    carry only paths, and each shard's join reads its own rows."""
    impressions, actions = (table.sort_by("event_time_ms") for table in read_events(spec, log_dir, dead_letters))
    times = np.concatenate([impressions.column("event_time_ms").to_numpy(), actions.column("event_time_ms").to_numpy()])
    times.sort()
    impression_times = impressions.column("event_time_ms").to_numpy()
    action_times = actions.column("event_time_ms").to_numpy()
    bounds = [int(t) for t in times[::events_per_step][1:]] + [None]
    imp_start = act_start = 0
    first = int(times[0]) if len(times) else 0
    batches = []
    for step, bound in enumerate(bounds):
        imp_end = len(impression_times) if bound is None else int(np.searchsorted(impression_times, bound, "left"))
        act_end = len(action_times) if bound is None else int(np.searchsorted(action_times, bound, "left"))
        batch = impressions.slice(imp_start, imp_end - imp_start), actions.slice(act_start, act_end - act_start)
        if shards is None:
            batches.append((first, spill_table(batch[0], spill_dir / f"{step:06d}-impressions.arrow"),
                            spill_table(batch[1], spill_dir / f"{step:06d}-actions.arrow")))
        else:
            batches += [(first, *record) for record in spill_shards(*batch, shards, spill_dir, f"{step:06d}")]
        if bound is not None:
            first = bound
        imp_start, act_start = imp_end, act_end
    step_ms = int(np.median(np.diff(times[::events_per_step]))) if len(times) > events_per_step else 0
    return Replay(batches, step_ms, int(times[-1]) if len(times) else None)


OUTPUTS = ("examples", "dead_letters", "metrics")


def fresh_output_dirs(out_dir: Path, subdirs: tuple[str, ...] = OUTPUTS[:2]) -> None:
    """Empty (or create) the output subdirectories a run writes: examples, dead letters and,
    when training, the metric parts."""
    for sub in subdirs:
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / sub).mkdir(parents=True)


def count_dead_letters(out_dir: Path) -> dict[str, int]:
    """Dead letters by reason, counted from what was written to ``OUT/dead_letters`` (an engine's
    counters can miss letters - Beam's in streaming mode did - the files are what a user gets)."""
    import json

    counts: dict[str, int] = {}
    for part in sorted((out_dir / "dead_letters").glob("*.jsonl")):
        with open(part, encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    reason = json.loads(line)["reason"]
                    counts[reason] = counts.get(reason, 0) + 1
    return counts


def finish_metrics(spec: FeatureSpec, out_dir: Path) -> dict:
    """Merge the metric rows into ``metrics.jsonl`` + ``metrics.png``; returns the summary."""
    from trainer.report import plot_metrics, read_metric_rows, write_metric_rows

    summary, rows = {}, {}
    for part in sorted((out_dir / "metrics").glob("*.jsonl")):
        for row in read_metric_rows(part):
            if row.get("final"):  # a summary; the last one has the most examples
                if row["examples"] >= summary.get("examples", -1):
                    summary = {k: v for k, v in row.items() if k != "final"}
            else:  # one row per window (a resumed trainer gives the restored snapshot's rows again)
                rows[row["window_start_ms"]] = row
    shutil.rmtree(out_dir / "metrics", ignore_errors=True)
    rows = write_metric_rows(rows.values(), out_dir / "metrics.jsonl")
    if rows:
        plot_metrics(rows, out_dir / "metrics.png", f"{spec.name}: progressive validation per "
                     f"{format_duration_ms(spec.training.metrics_window_ms)} of event time")
    summary["metric_windows"] = len(rows)
    return summary
