"""Converters and generator: counts equal the source's, timestamps ordered, determinism, teacher AUC."""
import hashlib

import numpy as np
import pyarrow.csv as pa_csv
import pytest

from event_datasets import movielens, obd
from event_datasets.synthetic import SyntheticConfig, SyntheticStream, exact_auc, generate
from schemas.events import load_schema
from schemas.logs import log_files, read_log_file, read_manifest
from schemas.spec import load_spec


def _read_all(logs, spec_name):
    spec = load_spec(spec_name)
    out = {}
    for kind, schema in (("impressions", spec.events.impression), ("actions", spec.events.action)):
        files = log_files(logs, kind)
        out[kind] = [list(read_log_file(path, load_schema(schema))) for path in files]
    return out


def _assert_monotone_per_file(per_file):
    for records in per_file:
        times = [r["event_time_ms"] for r in records]
        assert times == sorted(times)


def test_movielens_counts_match_the_source(movielens_logs):
    logs, manifest = movielens_logs
    ratings = movielens._read_tsv(movielens.source_files()["inter"]).column("rating").to_numpy()
    likes_in_source = int((ratings >= 4).sum())
    logs_read = _read_all(logs, "movielens")
    impressions = [r for f in logs_read["impressions"] for r in f]
    actions = [r for f in logs_read["actions"] for r in f]
    assert len(impressions) == len(ratings) == manifest["impressions"] == 100_000
    assert len(actions) == likes_in_source == manifest["actions"]["like"]
    assert {a["action_type"] for a in actions} == {"like"}
    assert len({r["request_id"] for r in impressions}) == 100_000
    _assert_monotone_per_file(logs_read["impressions"])
    _assert_monotone_per_file(logs_read["actions"])
    by_request = {r["request_id"]: r for r in impressions}
    delays = np.array([a["event_time_ms"] - by_request[a["request_id"]]["event_time_ms"] for a in actions])
    assert delays.min() >= 0
    assert abs(delays.mean() / 1000 - movielens.LIKE_DELAY_MEAN_S) < 3  # exponential, mean 120 s
    sample = impressions[0]
    assert sample["genres"] and sample["occupation"] and sample["age"] > 0


def test_obd_counts_match_the_source(obd_logs):
    logs, manifest = obd_logs
    source = pa_csv.read_csv(obd.source_files("random", "all")["log"])
    logs_read = _read_all(logs, "obd")
    impressions = [r for f in logs_read["impressions"] for r in f]
    actions = [r for f in logs_read["actions"] for r in f]
    assert len(impressions) == source.num_rows == 10_000
    assert len(actions) == int(source.column("click").to_numpy().sum()) == manifest["actions"]["click"]
    _assert_monotone_per_file(logs_read["impressions"])
    _assert_monotone_per_file(logs_read["actions"])
    assert read_manifest(logs)["dataset"] == "open-bandit-dataset/random/all"


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("fmt", ["parquet", "avro"])
def test_generator_same_seed_gives_identical_bytes(tmp_path, fmt):
    config = SyntheticConfig(events=30_000, seed=5, span_hours=3, chunk_size=7_000)
    generate(tmp_path / "a", config, fmt)
    generate(tmp_path / "b", config, fmt)
    generate(tmp_path / "c", SyntheticConfig(events=30_000, seed=6, span_hours=3, chunk_size=7_000), fmt)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_generator_stream_shape_and_teacher_auc(tmp_path):
    config = SyntheticConfig(events=60_000, seed=2, span_hours=4, chunk_size=20_000)
    manifest = generate(tmp_path, config)
    logs_read = _read_all(tmp_path, "synthetic")
    impressions = [r for f in logs_read["impressions"] for r in f]
    actions = [r for f in logs_read["actions"] for r in f]
    assert len(impressions) == 60_000 and len(actions) == manifest["actions"]["click"]
    assert len(log_files(tmp_path, "impressions")) == 4
    _assert_monotone_per_file(logs_read["impressions"])
    _assert_monotone_per_file(logs_read["actions"])
    assert 0.1 < manifest["ctr"] < 0.3
    # The teacher is informative but not perfect: Criteo-like difficulty.
    assert 0.7 < manifest["teacher_auc"] < 0.9
    # Recompute the teacher AUC from the stream itself.
    p_click, labels = [], []
    clicked = {a["request_id"] for a in actions}
    for impressions_chunk, _, p in SyntheticStream(config).chunks():
        p_click.append(p)
        labels.append(np.isin(impressions_chunk.column("request_id").to_numpy(zero_copy_only=False), list(clicked)))
    assert exact_auc(np.concatenate(p_click), np.concatenate(labels)) == pytest.approx(manifest["teacher_auc"], abs=1e-6)
    # Zipf: the most frequent C1 value is far more common than the median one; nulls occur.
    c1 = [r["C1"] for r in impressions]
    values, counts = np.unique([v for v in c1 if v is not None], return_counts=True)
    assert counts.max() > 20 * np.median(counts)
    assert all(0 <= v < (1 << 62) for v in values)


def test_generator_new_ids_appear_over_time(tmp_path):
    config = SyntheticConfig(events=40_000, seed=3, span_hours=48, chunk_size=10_000, churn_per_day=0.5)
    stream = SyntheticStream(config)
    first, *_, last = [chunk[0] for chunk in stream.chunks()]
    early = set(first.column("C3").drop_null().to_pylist())
    late = set(last.column("C3").drop_null().to_pylist())
    assert len(late - early) > 0.8 * len(late)


def test_exact_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pairs = [(s_p > s_n) + 0.5 * (s_p == s_n) for s_p in scores[labels] for s_n in scores[~labels]]
    assert exact_auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert np.isnan(exact_auc(scores, np.zeros(60)))


def test_generator_config_is_validated():
    with pytest.raises(ValueError, match="target_ctr must be in"):
        SyntheticConfig(target_ctr=1.5)
    with pytest.raises(ValueError, match="cardinalities must be 26 values"):
        SyntheticConfig(cardinalities=(10, 20))
