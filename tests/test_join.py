"""The pure join, sampler and feature extraction, with exact expectations."""
import math

import numpy as np
import pyarrow as pa
import pytest

from schemas.hashing import splitmix64
from schemas.spec import load_spec, parse_spec
from trainer.hashing import mix64
from transforms.examples import ExampleBuilder
from transforms.features import FeatureExtractor, hash48_string
from transforms.join import JoinConfig, Joined, StreamJoiner, join_key_events, run_join
from transforms.sampling import NegativeSampler, corrected_probability, stable_uniform

W = 1_000
CONFIG = JoinConfig(window_ms=W, label_actions=("click", "like"), target="click")


def imp(key, t):
    return ("impression", key, None, t, {"key": key, "t": t})


def act(key, kind, t):
    return ("action", key, kind, t, {"key": key, "kind": kind, "t": t})


def split(outputs):
    joined = {o.impression["key"]: o for o in outputs if isinstance(o, Joined)}
    dead = sorted((o.reason, o.record) for o in outputs if not isinstance(o, Joined))
    return joined, dead


def test_labels_per_action_type_and_window_edges():
    events = [imp("a", 0), imp("b", 10), act("a", "click", 500), act("a", "like", 1_000),  # like exactly at W
              act("b", "click", 1_011)]  # 1 ms past b's window
    joined, dead = split(run_join(CONFIG, sorted(events, key=lambda e: e[3])))
    assert joined["a"].labels == {"click": 1, "like": 1}
    assert joined["a"].label_times_ms == {"click": 500, "like": 1_000}
    assert joined["b"].labels == {"click": 0, "like": 0}
    assert [reason for reason, _ in dead] == ["late_action"]


def test_action_before_impression_is_held_and_joined():
    events = [act("a", "click", 100), imp("a", 90)]  # out of order: the action arrives first
    joined, dead = split(run_join(CONFIG, events))
    assert joined["a"].labels["click"] == 1 and dead == []


def test_orphan_action_and_late_action_after_close():
    joiner = StreamJoiner(CONFIG)
    assert joiner.action("x", "click", 100, "orphan") == []
    assert joiner.impression("y", 0, {"key": "y"}) == []
    out = joiner.advance_watermark(1_001)  # y's window [0, 1000] closes
    assert [o.labels for o in out] == [{"click": 0, "like": 0}]
    late = joiner.action("y", "click", 900, "late")  # arrives after its window closed
    assert [(d.reason, d.record) for d in late] == [("late_action", "'late'")]
    out = joiner.advance_watermark(1_101)
    assert [(d.reason, d.record) for d in out] == [("orphan_action", "'orphan'")]
    joiner.advance_watermark(2_001)
    assert joiner.live_keys == 0  # the tombstone is gone too


def test_duplicates_are_emitted_once_and_reported():
    events = [imp("a", 0), imp("a", 5), act("a", "click", 10), act("a", "click", 10), act("a", "share", 12)]
    joined, dead = split(run_join(CONFIG, events))
    assert list(joined) == ["a"] and joined["a"].labels["click"] == 1
    assert [reason for reason, _ in dead] == ["duplicate_action", "duplicate_impression", "unlabelled_action"]


def test_early_positive_is_emitted_once():
    config = JoinConfig(window_ms=W, label_actions=("click", "like"), target="click", emit_positive_early=True)
    joiner = StreamJoiner(config)
    joiner.impression("a", 0, {"key": "a"})
    early = joiner.action("a", "click", 50, None)
    assert len(early) == 1 and early[0].labels == {"click": 1, "like": 0}
    assert joiner.action("a", "like", 60, None) == []
    assert joiner.flush() == []  # not emitted again at window end


def test_action_more_than_two_windows_late_is_an_orphan_in_every_mode():
    events = [imp("a", 0), act("a", "click", 2 * W + 1)]
    _, dead = split(run_join(CONFIG, events))
    assert [r for r, _ in dead] == ["orphan_action"]
    _, dead_batch = split(join_key_events(CONFIG, [e[:1] + e[2:] for e in events]))
    assert [r for r, _ in dead_batch] == ["orphan_action"]


def test_state_is_freed_on_a_long_stream():
    rng = np.random.default_rng(0)
    joiner = StreamJoiner(CONFIG)
    peak = 0
    for i in range(20_000):
        t = i * 10
        joiner.impression(i, t, {"key": i})
        if rng.random() < 0.3:
            joiner.action(i, "click", t + int(rng.integers(0, 2 * W)), None)
        joiner.advance_watermark(t)
        peak = max(peak, joiner.live_keys)
    # live keys: one window of open impressions plus one of tombstones (100 events / window)
    assert peak <= 2 * W // 10 + 5
    joiner.flush()
    assert joiner.live_keys == 0 and not joiner.scheduled


def test_streaming_and_batch_drivers_agree_on_shuffled_arrival():
    rng = np.random.default_rng(1)
    events = []
    for i in range(300):
        t = int(rng.integers(0, 50_000))
        events.append(imp(i, t))
        for kind in ("click", "like", "share"):
            if rng.random() < 0.4:
                events.append(act(i, kind, t + int(rng.integers(-50, 3 * W))))
    for i in range(300, 320):  # orphans
        events.append(act(i, "click", int(rng.integers(0, 50_000))))
    ordered = sorted(events, key=lambda e: e[3])
    streamed = run_join(CONFIG, ordered)
    by_key: dict = {}
    for kind, key, action_type, t, record in reversed(ordered):  # any arrival order
        by_key.setdefault(key, []).append((kind, action_type, t, record))
    batched = [o for key in by_key for o in join_key_events(CONFIG, by_key[key])]
    s_joined, s_dead = split(streamed)
    b_joined, b_dead = split(batched)
    assert {k: (j.labels, j.label_times_ms) for k, j in s_joined.items()} == \
        {k: (j.labels, j.label_times_ms) for k, j in b_joined.items()}
    assert s_dead == b_dead


def test_sampler_is_deterministic_and_within_binomial_bounds():
    sampler = NegativeSampler(rate=0.1, seed=3)
    kept = sum(sampler.decide(f"r{i}", "i", False)[0] for i in range(20_000))
    assert abs(kept - 2_000) < 4 * math.sqrt(20_000 * 0.1 * 0.9)
    again = NegativeSampler(rate=0.1, seed=3)
    assert [again.decide(f"r{i}", "i", False)[0] for i in range(100)] == \
        [NegativeSampler(0.1, 3).decide(f"r{i}", "i", False)[0] for i in range(100)]
    assert stable_uniform(3, "r1", "i") == stable_uniform(3, "r1", "i") != stable_uniform(4, "r1", "i")
    assert corrected_probability(0.5, 0.1) == pytest.approx(0.5 / (0.5 + 0.5 / 0.1))


def test_numpy_and_torch_hashes_agree():
    import torch

    values = np.array([0, 1, 12345, (1 << 62) + 9], dtype=np.uint64)
    assert splitmix64(values).view(np.int64).tolist() == mix64(torch.tensor(values.view(np.int64))).tolist()


SPEC = {
    "name": "features",
    "events": {"impression": "movielens_impression", "action": "action"},
    "defaults": {"dim": 4},
    "slots": [
        {"name": "user", "source": "user_id"},
        {"name": "age", "source": "age", "kind": "bucketized", "boundaries": [18, 30]},
        {"name": "genres", "source": "genres", "kind": "multi_valued"},
        {"name": "user_x_genres", "kind": "cross", "cross": ["user", "genres"]},
        {"name": "year", "source": "release_year", "missing": "dead_letter"},
    ],
    "dense": [{"name": "age", "source": "age", "normalization": "standard", "mean": 30, "std": 10}],
    "labels": {"actions": ["like"]},
}


def _record(user="u1", age=25, genres=("Drama", "War"), year=1990):
    return {"request_id": "r", "user_id": user, "item_id": "i", "event_time_ms": 0, "position": 0, "age": age,
            "gender": "F", "occupation": "x", "zip_code": "1", "release_year": year, "genres": list(genres)}


def test_feature_extraction_exact():
    spec = parse_spec(SPEC)
    extractor = FeatureExtractor(spec)
    table = extractor.table_from_records([_record(), _record(user="u2", age=40, genres=(), year=None),
                                          _record(age=None, year=1995)])
    fids, dense, keep, letters = extractor.extract(table)
    assert keep.tolist() == [True, False, True]
    assert [(d.reason, d.detail) for d in letters] == [
        ("missing_value", "slot 'year': no value in field(s) ['release_year']")]
    row = fids[0].as_py()
    slots = [f >> 48 for f in row]
    assert slots == [1, 2, 3, 3, 4, 4, 5]  # user, age bucket, 2 genres, 2 crosses, year
    assert row[0] == (1 << 48) | hash48_string("u1")
    age_bucket = int(np.searchsorted([18.0, 30.0], 25.0, side="right"))  # 1
    assert row[1] == (2 << 48) | int(splitmix64(np.array([age_bucket], dtype=np.uint64))[0] & np.uint64((1 << 48) - 1))
    assert row[2:4] == [(3 << 48) | hash48_string("Drama"), (3 << 48) | hash48_string("War")]
    assert dense[0].as_py() == [pytest.approx(-0.5)]
    # A missing numeric value maps to the slot's default fid (hash 0) and the dense default.
    third = fids[1].as_py()
    assert third[1] == 2 << 48 and dense[1].as_py() == [pytest.approx(-3.0)]


def test_fids_are_stable_across_processes():
    import subprocess
    import sys

    code = ("from transforms.features import hash48_string; print(hash48_string('Comedy'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == hash48_string("Comedy")


def test_example_builder_on_movielens_records():
    spec = load_spec("movielens")
    builder = ExampleBuilder(spec)
    joined = [Joined(_record(), 0, {"like": 1}, {"like": 5}), Joined(_record(user="u9"), 0, {"like": 0}, {})]
    table, letters = builder.build(joined)
    assert table.num_rows == 2 and letters == []
    rows = table.to_pylist()
    assert rows[0]["labels"] == [("like", 1)] and rows[0]["sample_rate"] == 1.0
    assert all(len(r["fids"]) >= len(spec.slots) for r in rows)
    assert isinstance(table.schema, pa.Schema)


def _run_batch_joiner(config, ordered, batch_size):
    import pyarrow as pa

    from transforms.batch_join import BatchJoiner

    joiner = BatchJoiner(config)
    outputs, records = [], []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start:start + batch_size]
        imps = [e for e in chunk if e[0] == "impression"]
        acts = [e for e in chunk if e[0] == "action"]
        watermark = ordered[start + batch_size][3] if start + batch_size < len(ordered) else chunk[-1][3]
        joined, dead = joiner.add(
            pa.array([str(e[1]) for e in imps], pa.string()), np.array([e[3] for e in imps], np.int64),
            np.arange(len(records), len(records) + len(imps)), pa.array([str(e[1]) for e in acts], pa.string()),
            [e[2] for e in acts], np.array([e[3] for e in acts], np.int64), [e[4] for e in acts], watermark)
        records += [e[4] for e in imps]
        outputs += [(j, records[j.impression]) for j in joined.to_joined()] + dead
    joined, dead = joiner.flush()
    assert joiner.live_keys == 0
    return outputs + [(j, records[j.impression]) for j in joined.to_joined()] + dead


@pytest.mark.parametrize("batch_size", [1, 7, 64, 10_000])
def test_batch_joiner_makes_the_same_decisions(batch_size):
    rng = np.random.default_rng(2)
    events = []
    for i in range(400):
        t = int(rng.integers(0, 60_000))
        events.append(imp(i, t))
        if rng.random() < 0.05:
            events.append(imp(i, t + int(rng.integers(0, 2_000))))  # duplicate impression
        for kind in ("click", "like", "share"):
            if rng.random() < 0.4:
                t_a = t + int(rng.integers(-50, 3 * W))
                events.append(act(i, kind, t_a))
                if rng.random() < 0.1:
                    events.append(act(i, kind, t_a))  # duplicate action
    for i in range(400, 430):
        events.append(act(i, "click", int(rng.integers(0, 60_000))))
    ordered = sorted(events, key=lambda e: e[3])
    expected_joined, expected_dead = split(run_join(CONFIG, ordered))
    outputs = _run_batch_joiner(CONFIG, ordered, batch_size)
    joined = {record["key"]: j for j, record in (o for o in outputs if isinstance(o, tuple))}
    assert {k: (j.labels, j.label_times_ms, j.impression_time_ms) for k, j in joined.items()} == \
        {k: (j.labels, j.label_times_ms, j.impression_time_ms) for k, j in expected_joined.items()}
    dead = sorted((o.reason, o.record) for o in outputs if not isinstance(o, tuple))
    assert [r for r, _ in dead] == [r for r, _ in expected_dead]
    # action dead letters carry the same action records (impression duplicates carry row numbers here)
    assert sorted(r for _, r in dead if "'kind'" in r) == sorted(r for _, r in expected_dead if "'kind'" in r)


def test_join_tables_dead_letters_carry_action_records_at_any_size():
    """Backfill shards with 100k+ actions once carried row numbers as their action references;
    the dead letters must show the action, as the streaming join's do."""
    from transforms.batch_join import join_tables

    n = 100_001
    impressions = pa.table({"request_id": ["r0"], "item_id": ["i0"], "event_time_ms": pa.array([0], pa.int64())})
    actions = pa.table({"request_id": ["r0"] * (n - 1) + ["nobody"], "item_id": ["i0"] * n,
                        "event_time_ms": pa.array(np.arange(n), pa.int64()),
                        "action_type": ["share"] * (n - 1) + ["click"]})
    batches = join_tables(CONFIG, impressions, actions)
    next(batches)
    letters = [letter for _, dead in batches for letter in dead]
    assert sorted({letter.reason for letter in letters}) == ["orphan_action", "unlabelled_action"]
    assert len(letters) == n
    orphan = next(letter for letter in letters if letter.reason == "orphan_action")
    assert orphan.record == repr({"request_id": "nobody", "item_id": "i0", "event_time_ms": n - 1,
                                  "action_type": "click"})
    assert all("'action_type': 'share'" in letter.record for letter in letters if letter.reason != "orphan_action")
