"""The Redis row store: real redis-server processes on loopback (two shards and a one-node
Redis Cluster, started here and stopped by process group), the table's property tests through
the Redis tier, data-time expiry and TTLs, failures, and the trainer with Redis vs in memory."""
from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runners.redis_server import RedisServer, redis_server_binary
from tests.test_embedding_table import POLICIES, SLOT_A, SLOT_B, Reference, apply, fid, operation, small_config
from trainer.embedding_table import EmbeddingTable
from trainer.redis_config import HashRing, RedisStoreConfig
from trainer.redis_store import RedisStore, StoreUnavailable
from trainer.rows import RowBatch
from trainer.table_config import TableConfig

_prefixes = itertools.count()

try:
    redis_server_binary()
except FileNotFoundError as missing:  # make test installs it with apt-get where it can
    pytest.skip(str(missing), allow_module_level=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    servers = [RedisServer(tmp_path_factory.mktemp(f"redis{i}")).start() for i in range(2)]
    yield servers
    for server in servers:
        server.stop()
    assert all(server.process is None for server in servers)


def store_uri(servers, **params) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"prefix": f"t{next(_prefixes)}", **params}.items())
    return "redis://" + ",".join(server.address for server in servers) + "?" + query


def rows_for(fids: list[int], dim: int = 3, state_width: int = 2, seen: int = 0) -> RowBatch:
    n = len(fids)
    return RowBatch(torch.tensor(fids), torch.randn(n, dim), torch.rand(n, state_width),
                    torch.full((n,), seen, dtype=torch.int64), torch.arange(1, n + 1, dtype=torch.int32))


def test_uri_is_parsed_and_bad_values_are_named():
    config = RedisStoreConfig.from_uri("redis://:secret@10.0.0.1:6379,10.0.0.2:6380/2?prefix=ads&cache_rows=5000&ttl=off")
    assert config.servers == (("10.0.0.1", 6379), ("10.0.0.2", 6380)) and config.db == 2
    assert (config.password, config.prefix, config.cache_rows, config.ttl) == ("secret", "ads", 5000, False)
    assert RedisStoreConfig.from_uri("redis+cluster://h:7000").cluster
    for bad, named in (("http://h:1", "http://h:1"), ("redis://h", "'h'"), ("redis://h:1?cache=3", "cache"),
                       ("redis://h:1?cache_rows=many", "many"), ("redis://h:1?ttl=maybe", "maybe")):
        with pytest.raises(ValueError, match=named):
            RedisStoreConfig.from_uri(bad)


def test_rows_round_trip_bit_exact_over_two_shards(shards):
    store = RedisStore(RedisStoreConfig.from_uri(store_uri(shards)), TableConfig(dim=3, state_width=2))
    fids = [fid(SLOT_A, v) for v in range(500)]
    rows = rows_for(fids)
    store.put_rows(rows)
    found, got = store.get_rows(torch.tensor(fids[::-1] + [fid(SLOT_A, 10_000)]))
    assert found.tolist() == [True] * 500 + [False]
    for name in ("fids", "embeddings", "state", "last_seen_ms", "counts"):
        assert torch.equal(getattr(got, name), getattr(rows, name).flip(0)), name
    per_shard = [sum(1 for _ in client.scan_iter(match=store.key_prefix + b"*")) for client in store.clients]
    assert sum(per_shard) == 500 and min(per_shard) > 150  # both shards hold rows
    store.delete(torch.tensor(fids[:100]))
    assert len(store) == 400 and not store.get_rows(torch.tensor(fids[:100]))[0].any()


def test_consistent_hashing_moves_about_one_in_n_plus_one_rows():
    fids = torch.arange(200_000, dtype=torch.int64)
    two = HashRing(["a:1", "b:2"]).shard_of(fids)
    three = HashRing(["a:1", "b:2", "c:3"]).shard_of(fids)
    moved = (two != three).mean()
    assert 0.25 < moved < 0.42 and ((two != three) <= (three == 2)).all()  # only rows to the new server move


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(operation, min_size=1, max_size=25))
def test_bounded_cache_over_redis_loses_nothing(shards, ops):
    """The table's property test through the Redis tier: a cache of 8 rows, many evictions."""
    table_config = small_config(max_rows=8, evict_fraction=0.25)
    store = RedisStore(RedisStoreConfig.from_uri(store_uri(shards, ttl="off")), table_config)
    cache = EmbeddingTable(table_config, store=store)
    reference = Reference()
    for op in ops:
        kind, fids, _ = op
        if kind == "insert" and len(set(fids)) > 8:
            continue
        apply(cache, reference, op)
    universe = sorted(reference.rows)
    cached = cache.lookup(torch.tensor(universe, dtype=torch.int64))
    found, stored = store.get_rows(torch.tensor(universe, dtype=torch.int64))
    by_fid = {f: e for f, e in zip(stored.fids.tolist(), stored.embeddings.tolist())}
    for f, row in zip(universe, cached.tolist()):
        embedding = cache.embeddings[row].tolist() if row >= 0 else by_fid.get(f)
        assert embedding is not None, f"fid {f} lost between cache and Redis"
        assert embedding == reference.rows[f]["embedding"]
    cache.take_delta()  # writes back: now Redis alone holds every row
    found, stored = store.get_rows(torch.tensor(universe, dtype=torch.int64))
    assert bool(found.all()) and len(store) == len(universe)
    store.clear()


def test_expiry_runs_on_data_time_and_ttls_follow_it(shards):
    config = TableConfig(dim=3, state_width=2, slots=POLICIES)
    store = RedisStore(RedisStoreConfig.from_uri(store_uri(shards, ttl="on", ttl_grace_ms=60_000)), config)
    memory = EmbeddingTable(config)
    rows = rows_for([fid(SLOT_A, 1), fid(SLOT_B, 1), fid(SLOT_B, 2)], seen=1_000)
    rows.last_seen_ms[2] = 1_080
    for target in (store, memory):
        target.put_rows(rows)
    store.flush()  # the write goes out behind the caller: wait for it before reading Redis directly
    # the plain slot never expires: no TTL; the expiring one: rest of its data-time life + grace
    keys = store._keys(rows.fids.numpy())
    shard_of = store.ring.shard_of(rows.fids)
    ttls = [store.clients[int(shard)].pttl(key) for shard, key in zip(shard_of, keys)]
    assert ttls[0] == -1 and 0 < ttls[1] <= 1_000 + 100 - 1_080 + 60_000 < ttls[2] <= 1_080 + 100 - 1_080 + 60_000
    for now in (1_050, 1_150, 1_200):  # B expires 100 ms of data time after it was last seen
        assert sorted(store.expire_fids(now).tolist()) == sorted(memory.expire_fids(now).tolist())
    assert store.get_rows(rows.fids)[0].tolist() == [True, False, False]


def test_a_row_seen_again_after_it_was_written_does_not_expire_with_its_stale_stored_copy(shards):
    """Found by the property test above: a row written to Redis when last seen at 0, seen again
    at 28 (its cached copy is fresher), must survive an expiry at 101 with a 100 ms life - in
    the cache, in the delta and in Redis."""
    table_config = small_config(max_rows=8, evict_fraction=0.25)
    store = RedisStore(RedisStoreConfig.from_uri(store_uri(shards, ttl="off")), table_config)
    cache = EmbeddingTable(table_config, store=store)
    reference = Reference()
    expiring = fid(SLOT_B, 0)
    for op in [("insert", [fid(SLOT_A, v) for v in (0, 4, 5, 6, 7)] + [expiring], 0),
               ("insert", [fid(SLOT_A, v) for v in (1, 2, 3)], 28), ("insert", [expiring], 0), ("expire", [], 73)]:
        apply(cache, reference, op)
    assert expiring in reference.rows and int(cache.lookup(torch.tensor([expiring]))) >= 0
    delta = cache.take_delta()
    assert expiring not in delta.removed.tolist()
    found, rows = store.get_rows(torch.tensor([expiring]))
    assert bool(found.all()) and rows.embeddings[0].tolist() == reference.rows[expiring]["embedding"]


def test_workers_sharing_a_store_each_expire_only_the_rows_they_own(shards):
    """Two workers of a sharded trainer in front of one store (the same keys): each writes its
    own fids; one worker's expiry deletes its expired rows and leaves the other's to it."""
    from trainer.hashing import owner_of

    config = TableConfig(dim=3, state_width=2, slots=POLICIES)
    uri = store_uri(shards)
    workers = [RedisStore(RedisStoreConfig.from_uri(uri), config) for _ in range(2)]
    for rank, store in enumerate(workers):
        store.share(rank, 2)
    fids = torch.tensor([fid(SLOT_B, value) for value in range(200)] + [fid(SLOT_A, value) for value in range(20)])
    owners = owner_of(fids, 2)
    for rank, store in enumerate(workers):
        mine = rows_for(fids[owners == rank].tolist(), seen=1_000)
        store.put_rows(mine)
        store.flush()
    assert workers[0].tokens == workers[1].tokens and len(workers[0]) == len(fids)
    expiring = fids[:200]
    expired = workers[0].expire_fids(2_000)
    assert sorted(expired.tolist()) == sorted(expiring[owner_of(expiring, 2) == 0].tolist())
    found, _ = workers[1].get_rows(expiring)
    assert torch.equal(found, owner_of(expiring, 2) == 1)  # the other worker's rows are still there
    expired = workers[1].expire_fids(2_000)
    assert sorted(expired.tolist()) == sorted(expiring[owner_of(expiring, 2) == 1].tolist())
    assert sorted(workers[0].stored_fids().tolist()) == sorted(fids[200:].tolist())


def test_unreachable_redis_raises_a_clear_error_after_the_bound_and_recovers_when_back(tmp_path):
    server = RedisServer(tmp_path / "r", persistent=True).start()  # (without its data: tests/test_hostile_store.py)
    store = RedisStore(RedisStoreConfig.from_uri(f"redis://{server.address}?retry_for=1&timeout=0.5"),
                       TableConfig(dim=3, state_width=2))
    rows = rows_for([fid(SLOT_A, v) for v in range(10)])
    store.put_rows(rows)
    server.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=rf"redis {server.address} did not answer for 1 s while writing 10 rows"):
        store.put_rows(rows)  # write-behind: the failure surfaces when the write is waited for
        store.flush()
    assert time.monotonic() - started < 5
    # restarted within the bound with its data (append-only file): the write is retried and lands
    store.config = RedisStoreConfig.from_uri(f"redis://{server.address}?retry_for=20&timeout=0.5")
    restart = threading.Timer(1.0, server.start)
    restart.start()
    try:
        store.put_rows(rows)
        store.flush()
        restart.join()
        found, got = store.get_rows(rows.fids)
        assert bool(found.all()) and torch.equal(got.embeddings, rows.embeddings) and store.stats["retries"] > 0
    finally:
        restart.join()
        server.stop()


def test_redis_cluster(tmp_path):
    with RedisServer(tmp_path / "c", cluster=True) as node:
        store = RedisStore(RedisStoreConfig.from_uri(f"redis+cluster://{node.address}?prefix=c"),
                           TableConfig(dim=3, state_width=2, slots=POLICIES))
        rows = rows_for([fid(SLOT_A, v) for v in range(50)] + [fid(SLOT_B, v) for v in range(50)], seen=10)
        store.put_rows(rows)
        found, got = store.get_rows(rows.fids)
        assert bool(found.all()) and torch.equal(got.embeddings, rows.embeddings)
        assert len(store.expire_fids(500)) == 50 and len(store) == 50
        store.delete(rows.fids[:10])
        assert int(store.get_rows(rows.fids)[0].sum()) == 40


@pytest.fixture(scope="module")
def movielens_examples(movielens_ordered_examples):
    return movielens_ordered_examples.slice(0, 12_000)


def _train(trainer, examples, start: int, stop: int) -> None:
    batch = trainer.spec.training.batch_size
    for at in range(start, stop, batch):
        trainer.train_batch(examples.slice(at, min(batch, stop - at)))


def _all_rows(trainer) -> list[dict[int, list[float]]]:
    """fid -> embedding + optimizer state, per table: the cache and its store together."""
    tables = []
    for group in trainer.groups:
        table = group.table
        rows = {}
        if table.store is not None:
            table.write_back()
            fids = torch.from_numpy(np.sort(table.store.stored_fids()))
            found, stored = table.store.get_rows(fids)
            rows.update({f: e + s for f, e, s in zip(stored.fids.tolist(), stored.embeddings.tolist(),
                                                      stored.state.tolist())})
        cached = table.all_rows()
        rows.update({f: e + s for f, e, s in zip(cached.fids.tolist(), cached.embeddings.tolist(),
                                                  cached.state.tolist())})
        tables.append(rows)
    return tables


def test_trainer_with_redis_equals_the_in_memory_trainer_and_a_restart_continues(shards, movielens_examples,
                                                                                 tmp_path):
    """Same logs, same weights: an in-memory trainer vs one whose tables cache 300 rows in front
    of two Redis shards (thousands of evictions and fetches). Then the Redis trainer is dropped
    mid-stream (a kill) after a snapshot; a new one resumes from the snapshot and the rows written
    back to Redis, and ends with the in-memory trainer's weights again."""
    from schemas.spec import load_spec
    from trainer.online import OnlineTrainer
    from trainer.publish import Position, Publisher, restore_trainer

    spec = load_spec("movielens")
    examples, half = movielens_examples, 6_016  # a whole number of batches of 32
    uri = store_uri(shards, cache_rows=300, ttl="on")  # TTLs (wall clock) far beyond the test: no effect
    memory, cached = OnlineTrainer(spec), OnlineTrainer(spec, store=uri)
    _train(memory, examples, 0, half)
    _train(cached, examples, 0, half)
    assert all(group.table.stats["evicted"] > 1_000 and group.table.stats["fetched"] > 1_000
               for group in cached.groups)
    assert _all_rows(cached) == _all_rows(memory)
    Publisher(cached, tmp_path / "model").publish_snapshot(Position(examples=half))
    del cached  # killed: only what was written back (and the snapshot) survives

    resumed = OnlineTrainer(spec, store=uri)
    restore_trainer(resumed, tmp_path / "model")
    _train(memory, examples, half, examples.num_rows)
    _train(resumed, examples, half, examples.num_rows)
    assert _all_rows(resumed) == _all_rows(memory)
    for name, weights in memory.model.state_dict().items():
        assert torch.equal(weights, resumed.model.state_dict()[name]), name
    assert resumed.metrics.summary() == memory.metrics.summary()


def test_run_command_with_a_redis_store_gives_the_in_memory_figures(shards, obd_logs, tmp_path, capsys):
    """``streamrec run --store`` on Beam: the same progressive metrics as without a store (the
    weights are identical), with every table's rows in Redis at the end."""
    import json

    from runners.cli import main

    logs, _ = obd_logs
    figures = []
    for name, extra in (("memory", []), ("redis", ["--store", store_uri(shards, cache_rows=250)])):
        assert main(["run", "--spec", "obd", "--logs", str(logs), "--out", str(tmp_path / name), "--streaming",
                     "--no-progress", *extra]) == 0
        figures.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    memory, redis = figures
    assert redis["examples"] == memory["examples"] > 500
    assert (redis["auc"], redis["logloss"]) == (memory["auc"], memory["logloss"])
    assert redis["cache"]["evicted"] > 0 and redis["cache"]["fetched"] > 0 and "cache" not in memory


def test_serving_reads_rows_the_snapshot_lacks_from_redis(shards, movielens_examples, tmp_path):
    """A Redis-backed trainer snapshots only its cache; serving with ``store`` reads the other
    rows from Redis on a miss and answers as the trainer does; without it, it cannot."""
    from schemas.spec import load_spec
    from serving.model import ServingModel
    from trainer.online import OnlineTrainer
    from trainer.publish import Position, Publisher

    spec = load_spec("movielens")
    uri = store_uri(shards, cache_rows=300)
    trainer, memory = OnlineTrainer(spec, store=uri), OnlineTrainer(spec)  # the same weights (tested above)
    for each in (trainer, memory):
        _train(each, movielens_examples, 0, 4_000)
    Publisher(trainer, tmp_path / "model").publish_snapshot(Position(examples=4_000))
    probe = movielens_examples.slice(0, 200)  # old examples: most of their rows were evicted
    column = probe.column("fids").combine_chunks()
    dense = probe.column("dense").combine_chunks()
    expected = memory.predict_features(column, dense)
    served = {}
    for name, store in (("plain", None), ("read-through", uri)):
        model = ServingModel(tmp_path / "model", store=store)
        model.refresh()
        served[name] = model.model.predict_features(column, dense) if store is None else None
        if store is not None:
            with model.lock:
                model._read_through(column)
                served[name] = model.model.predict_features(column, dense)
            assert model.status()["read_through_rows"] > 100
    assert np.allclose(served["read-through"], expected, atol=1e-6)
    assert not np.allclose(served["plain"], expected, atol=1e-3)


def test_killed_trainer_restarts_on_the_same_redis(shards, tmp_path):
    """``streamrec run --store --model-dir`` is SIGKILLed (its process group) after two snapshots;
    ``--resume`` on the same Redis finishes the stream: every example trained once, and the
    restarted trainer reads rows the killed one had written back."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from event_datasets.synthetic import SyntheticConfig, generate
    from tests.test_flink import ROOT
    from trainer.publish import read_manifest

    logs, model = tmp_path / "logs", tmp_path / "model"
    generate(logs, SyntheticConfig(events=40_000, span_hours=72, seed=2))  # daily snapshots: two mid-stream
    command = [sys.executable, "-m", "runners.cli", "run", "--spec", "synthetic", "--logs", str(logs), "--out",
               str(tmp_path / "out"), "--streaming", "--no-progress", "--model-dir", str(model),
               "--store", store_uri(shards, cache_rows=60_000)]
    first = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while first.poll() is None and time.monotonic() < deadline:
            if model.exists() and sum(e["kind"] == "snapshot" for e in read_manifest(model)) >= 2:
                break
            time.sleep(0.1)
        assert first.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    resumed = subprocess.run(command + ["--resume"], cwd=ROOT, start_new_session=True, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_version"] is not None
    examples = summary["examples"]
    total = json.loads(subprocess.run([sys.executable, "-m", "runners.cli", "join", "--spec", "synthetic", "--logs",
                                       str(logs), "--out", str(tmp_path / "join")], cwd=ROOT, capture_output=True,
                                      text=True, timeout=300).stdout.strip().splitlines()[-1])["examples"]
    assert summary["examples_trained"] == total  # trained once each: the snapshot's count plus the rest
    # the rows written back after the snapshot had learned some: those are left out of the metrics, and said
    assert summary["resume_metrics"] in ("exact", "excluding re-trained")
    assert examples + summary["metrics_excluded_examples"] == total
    assert summary["cache"]["fetched"] > 0  # rows the killed trainer had written back (evicted or published)
