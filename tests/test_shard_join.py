"""The engine-free shard join, driven as an engine drives it (micro-batches, a watermark, timers),
makes the backfill's Examples; its open-impression entries go once their rows have closed."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from event_datasets.synthetic import SyntheticConfig, generate
from schemas.events import END_OF_TIME_MS
from schemas.spec import load_spec
from transforms.log_examples import examples_from_logs, read_events
from transforms.shard_join import EntryList, ShardJoin


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic")
    generate(path, SyntheticConfig(events=4_000, span_hours=3, seed=8))
    return path


def _examples(table: pa.Table) -> list:
    return sorted(zip(table.column("request_id").to_pylist(), table.column("item_id").to_pylist(),
                      map(tuple, table.column("labels").to_pylist()), table.column("fids").to_pylist()))


def test_shard_join_driven_by_a_watermark_equals_the_backfill(logs):
    spec = load_spec("synthetic")
    impressions, actions = (table.sort_by("event_time_ms") for table in read_events(spec, logs))
    join = ShardJoin(spec, emit_every_ms=None, load=lambda table: table)
    state, open_impressions = join.new_state(), EntryList()
    times = np.concatenate([impressions.column("event_time_ms").to_numpy(), actions.column("event_time_ms").to_numpy()])
    bounds = np.unique(np.quantile(times, np.linspace(0, 1, 40)).astype(np.int64))
    out, most_entries = [], 0
    for low, high in zip(bounds[:-1], bounds[1:]):
        timer = join.next_timer(state)
        if timer is not None and timer < low:  # the watermark (low - 1) has passed the timer
            table, _ = join.close_to(state, open_impressions, low - 1)
            out += [] if table is None else [table]
        last = high == bounds[-1]
        pick = [(t.column("event_time_ms").to_numpy() >= low) & (t.column("event_time_ms").to_numpy() < high + last)
                for t in (impressions, actions)]
        batch_impressions, batch_actions = (t.filter(pa.array(mask)) for t, mask in zip((impressions, actions), pick))
        join.add(state, open_impressions, batch_impressions, batch_impressions, batch_actions)
        most_entries = max(most_entries, len(open_impressions.get()))
    table, _ = join.close_to(state, open_impressions, END_OF_TIME_MS)
    out += [] if table is None else [table]
    assert state.idle and open_impressions.get() == []
    assert 0 < most_entries < 39  # entries went as their rows closed
    assert _examples(pa.concat_tables(out)) == _examples(examples_from_logs(spec, logs))


def test_timers_are_rounded_up_to_the_granularity():
    spec = load_spec("synthetic")
    join = ShardJoin(spec, emit_every_ms=10 * spec.join.window_ms, load=lambda table: table)
    assert join.granularity == 10 * spec.join.window_ms
    state = join.new_state()
    assert join.next_timer(state) is None
    impressions = pa.table({"request_id": ["r"], "item_id": ["i"], "event_time_ms": pa.array([12_345], pa.int64())})
    actions = pa.table({"request_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string()),
                        "event_time_ms": pa.array([], pa.int64()), "action_type": pa.array([], pa.string())})
    join.add(state, EntryList(), impressions, impressions, actions)
    assert join.next_timer(state) == join.granularity  # due 12,345 + window + 1, rounded up
