"""A Redis store that fails the trainer: unreachable at start, restarted without its data during
a run or between a kill and ``--resume``, and a resume over rows that had learned past the
snapshot. Real redis-server processes on loopback, stopped by process group."""
from __future__ import annotations

import dataclasses
import json

import pytest

from runners.redis_server import RedisServer, redis_server_binary
from tests.test_embedding_table import SLOT_A, fid
from tests.test_redis_store import rows_for, store_uri
from trainer.redis_config import RedisStoreConfig
from trainer.redis_store import RedisStore, StoreLost, StoreUnavailable
from trainer.table_config import TableConfig

try:
    redis_server_binary()
except FileNotFoundError as missing:
    pytest.skip(str(missing), allow_module_level=True)


def test_unreachable_at_start_is_a_clear_error_after_the_retry_bound(obd_logs, tmp_path, capsys):
    from runners.cli import main

    with pytest.raises(StoreUnavailable, match=r"redis 127\.0\.0\.1:1 did not answer for 0\.3 s"):
        RedisStore(RedisStoreConfig.from_uri("redis://127.0.0.1:1?retry_for=0.3&timeout=0.2"), TableConfig(dim=3))
    logs, _ = obd_logs
    code = main(["run", "--spec", "obd", "--logs", str(logs), "--out", str(tmp_path / "out"), "--no-progress",
                 "--store", "redis://127.0.0.1:1?retry_for=0.3&timeout=0.2"])
    error = capsys.readouterr().err
    assert code == 1 and "redis 127.0.0.1:1 did not answer" in error and "AttributeError" not in error


def test_a_server_restarted_without_its_data_is_detected_on_the_next_write_and_read(tmp_path):
    server = RedisServer(tmp_path / "r").start()
    try:
        store = RedisStore(RedisStoreConfig.from_uri(f"redis://{server.address}?retry_for=20&timeout=0.5"),
                           TableConfig(dim=3, state_width=2))
        rows = rows_for([fid(SLOT_A, v) for v in range(10)])
        store.put_rows(rows)
        store.flush()
        tokens = list(store.tokens)
        server.stop()  # SIGKILL; no persistence: it comes back empty
        server.start()
        with pytest.raises(StoreLost, match=rf"redis {server.address} lost the rows written to it"):
            store.put_rows(rows)  # retried through the restart, then the missing marker is seen
            store.flush()
        with pytest.raises(StoreLost):
            store.get_rows(rows.fids)  # and every later call refuses too
        again = RedisStore(RedisStoreConfig.from_uri(f"redis://{server.address}"), TableConfig(dim=3, state_width=2))
        assert again.tokens != tokens  # a new store: a snapshot's rows are not in it
        with pytest.raises(StoreLost, match="no longer holds them"):
            again.check_identity(tokens, "the snapshot's table 0")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture(scope="module")
def examples(movielens_ordered_examples):
    return movielens_ordered_examples


def _running(uri, model_dir, resume=False):
    from schemas.spec import load_spec
    from trainer.running import PublishOptions, RunningTrainer

    spec = dataclasses.replace(load_spec("movielens"), store=uri)
    return RunningTrainer(spec, "cpu", progress=False, publishing=PublishOptions(str(model_dir), resume=resume))


def test_a_restart_during_training_fails_the_run_and_resume_refuses_the_emptied_store(server, examples, tmp_path):
    uri = store_uri([server], cache_rows=300)
    running = _running(uri, tmp_path / "model")
    running.train([examples.slice(0, 4_000)], flush=False)
    running.publisher.publish_snapshot(running.position)
    server.stop()
    server.start()  # empty
    with pytest.raises(StoreLost, match="lost the rows written to it"):
        running.train([examples.slice(4_000, 4_000)], flush=False)  # evictions write to the store
    with pytest.raises(StoreLost, match="no longer holds them"):
        _running(uri, tmp_path / "model", resume=True)


def test_resume_over_redis_leaves_out_what_the_stored_rows_had_learned(server, examples, tmp_path):
    """Killed up to 8,000 examples after its newest snapshot (rows evicted and written back meanwhile), resumed
    on the same Redis: the re-trained examples are left out of the metrics, and the summary says
    so. A resume without store writes after the snapshot is exact."""
    uri = store_uri([server], cache_rows=300)
    whole = _running(store_uri([server], cache_rows=300), tmp_path / "whole")
    whole.train([examples], flush=True)
    killed = _running(uri, tmp_path / "model")
    rest, _ = killed.train([examples.slice(0, 4_000)], flush=False)
    killed.publisher.publish_snapshot(killed.position)
    killed.train([rest, examples.slice(4_000, 8_000)], flush=False)
    for group in killed.trainer.groups:
        group.table.store.flush()
    reached = killed.position.examples
    del killed  # SIGKILL: the snapshot and the rows in Redis remain

    resumed = _running(uri, tmp_path / "model", resume=True)
    resumed.train([examples], flush=True)
    summary, reference = resumed.summary(), whole.summary()
    excluded = summary["metrics_excluded_examples"]
    # (its scheduled snapshots may be newer than the one taken by hand)
    assert summary["resume_metrics"] == "excluding re-trained"
    assert 0 < excluded == reached - resumed.resumed_at.examples
    assert summary["examples"] + excluded == reference["examples"] == examples.num_rows
    assert summary["examples_trained"] == examples.num_rows
    assert abs(summary["auc"] - reference["auc"]) < 0.01  # not inflated by examples seen before

    other = store_uri([server], cache_rows=300)
    exact = _running(other, tmp_path / "exact")
    exact.train([examples.slice(0, 4_000)], flush=False)
    exact.publisher.publish_snapshot(exact.position)
    del exact
    again = _running(other, tmp_path / "exact", resume=True)
    again.train([examples], flush=True)
    assert again.summary()["resume_metrics"] == "exact" and again.summary()["metrics_excluded_examples"] == 0


def test_resume_after_the_final_snapshot_keeps_the_report(obd_logs, tmp_path, capsys):
    """Killed just after its final snapshot (here: a finished run), ``--resume`` trains nothing and
    reports what the snapshot had: the same metric windows and figures, a plot, and no rate."""
    from runners.cli import main

    logs, _ = obd_logs
    args = ["run", "--spec", "obd", "--logs", str(logs), "--out", str(tmp_path / "out"), "--no-progress",
            "--model-dir", str(tmp_path / "model")]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = (tmp_path / "out" / "metrics.jsonl").read_text()
    (tmp_path / "out" / "metrics.png").unlink()
    assert main(args + ["--resume"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == rows and rows.strip()
    assert (tmp_path / "out" / "metrics.png").is_file()
    assert second["metric_windows"] == first["metric_windows"] > 0
    assert (second["examples"], second["auc"]) == (first["examples"], first["auc"])
    assert second["examples_per_s"] is None and second["examples_trained_this_run"] == 0
    assert second["resume_metrics"] == "exact"
