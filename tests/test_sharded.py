"""The sharded trainer (trainer.sharded): K=2 workers in lockstep over gloo end with the model of
one worker trained on the global batch - dense weights, every embedding row and progressive AUC."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas.spec import load_spec
from trainer.sharded import owner_of, run_local_workers

PER_WORKER_BATCH = 64
CACHE_ROWS = 4_000  # rows a table caches in front of a store (a global batch touches up to 128 x 26)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float rounding: the difference within 1e-5 of the tensor's norm, and every element
    within 1e-4 (sums in another order differ in the last bits, and Adam's normalised step
    enlarges that where a gradient is ~0)."""
    assert float((actual - expected).norm()) <= 1e-5 * float(expected.norm()) + 1e-12, (
        float((actual - expected).norm()) / float(expected.norm()))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-12)


def _spec(batch_size: int = 2 * PER_WORKER_BATCH, store: str | None = None):
    spec = load_spec("synthetic")
    training = dataclasses.replace(spec.training, batch_size=batch_size, sequential_updates=False)
    return dataclasses.replace(spec, training=training, store=store)


def _train(examples_path: str, model_dir: str, collectives=None, store: str | None = None):
    """Train the examples (RunningTrainer: the trainer's order, batches, publishing to ``model_dir``):
    with ``collectives``, a worker's batch of ``PER_WORKER_BATCH``; alone, the global batch."""
    from trainer.running import PublishOptions, RunningTrainer

    spec = _spec(PER_WORKER_BATCH if collectives is not None else 2 * PER_WORKER_BATCH, store)
    running = RunningTrainer(spec, "cpu", False, PublishOptions(model_dir), collectives)
    running.train([pq.read_table(examples_path)], flush=True)
    running.finish()
    return running


def _worker(rank: int, world: int, port: int, examples_path: str, out: str, store: str | None = None) -> None:
    import torch.distributed as dist

    from trainer.sharded import Collectives

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        trainer = _train(examples_path, f"{out}/model-2", Collectives(), store).trainer
        rows = [group.table.all_rows() for group in trainer.groups]  # (with a store: the cache's)
        torch.save({"model": trainer.model.state_dict(), "metrics": trainer.metrics.summary(),
                    "rows": [(r.fids, r.embeddings, r.state) for r in rows]}, f"{out}/worker-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory):
    from transforms.log_examples import synthetic_examples

    path = tmp_path_factory.mktemp("sharded") / "examples.parquet"
    examples = synthetic_examples(_spec(), impressions=6_000, seed=11)
    # the last global batch holds one example: the second worker's slice is empty
    extra = (1 - examples.num_rows) % (2 * PER_WORKER_BATCH)
    pq.write_table(pa.concat_tables([examples, examples.slice(0, extra)]), path)
    return path


def test_two_workers_end_with_the_single_worker_model(examples_file, tmp_path):
    from serving.model import ServingModel
    from trainer.publish import read_manifest

    world = 2
    run_local_workers(_worker, world, str(examples_file), str(tmp_path), timeout_s=300)

    single = _train(str(examples_file), str(tmp_path / "model-1")).trainer
    expected_metrics = single.metrics.summary()
    results = [torch.load(tmp_path / f"worker-{rank}.pt", weights_only=True) for rank in range(world)]
    for result in results:
        assert result["metrics"]["examples"] == expected_metrics["examples"]
        assert round(result["metrics"]["auc"], 4) == round(expected_metrics["auc"], 4)
        for name, value in single.model.state_dict().items():
            _assert_close(result["model"][name], value)
    for index, group in enumerate(single.groups):
        whole = group.table.all_rows()
        parts = [result["rows"][index] for result in results]
        for rank, (fids, _, _) in enumerate(parts):  # each fid on its owner only
            assert bool((owner_of(fids, world) == rank).all())
        fids = torch.cat([p[0] for p in parts])
        order = torch.argsort(fids)
        assert torch.equal(fids[order], whole.fids)  # every row, once
        _assert_close(torch.cat([p[1] for p in parts])[order], whole.embeddings)
        _assert_close(torch.cat([p[2] for p in parts])[order], whole.state)
    assert len(np.unique(torch.cat([r["rows"][0][0] for r in results]).numpy())) > 100

    # Published: every version of the K=2 model has both shards' parts; served, it answers as K=1
    one, two = read_manifest(tmp_path / "model-1"), read_manifest(tmp_path / "model-2")
    assert [e["kind"] for e in two] == [e["kind"] for e in one] and len(two) > 3
    assert all(e["shards"] == 2 for e in two) and all(e["shards"] == 1 for e in one)
    examples = pq.read_table(examples_file).slice(0, 500)
    served = [ServingModel(tmp_path / name) for name in ("model-1", "model-2")]
    for model in served:
        assert model.refresh() and model.version == len(one)
    expected = served[0].model.predict_features(examples.column("fids"), examples.column("dense"))
    got = served[1].model.predict_features(examples.column("fids"), examples.column("dense"))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _stored_rows(uri: str, spec) -> list:
    """Every table's rows in the store at ``uri``, by fid: (fids, embeddings, state)."""
    from trainer.redis_config import RedisStoreConfig
    from trainer.redis_store import RedisStore

    tables = []
    for index, group in enumerate(_single_groups(spec)):
        store = RedisStore(RedisStoreConfig.from_uri(uri), group, name=f"{spec.name}:g{index}", writer=False)
        fids = torch.from_numpy(np.sort(store.stored_fids()))
        found, rows = store.get_rows(fids)
        assert bool(found.all())
        tables.append((fids, rows.embeddings, rows.state))
    return tables


def _single_groups(spec) -> list:
    from trainer.online import OnlineTrainer

    return [group.table.config for group in OnlineTrainer(spec).groups]


def test_two_workers_in_front_of_one_redis_store_end_with_the_single_worker_model(examples_file, tmp_path):
    """``--store`` with K=2: each worker's tables are a small cache (CACHE_ROWS) in front of the same
    Redis store, with evictions and fetches; the store ends with the rows K=1 leaves in its own."""
    from runners.redis_server import RedisServer, redis_server_binary

    try:
        redis_server_binary()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    server = RedisServer(tmp_path / "redis").start()
    try:
        uris = [f"redis://{server.address}?prefix=k{k}&cache_rows={CACHE_ROWS}" for k in (1, 2)]
        run_local_workers(_worker, 2, str(examples_file), str(tmp_path), uris[1], timeout_s=300)
        single = _train(str(examples_file), str(tmp_path / "model-1"), store=uris[0]).trainer
        assert all(group.table.stats["evicted"] > 100 for group in single.groups)
        results = [torch.load(tmp_path / f"worker-{rank}.pt", weights_only=True) for rank in range(2)]
        for result in results:
            assert round(result["metrics"]["auc"], 4) == round(single.metrics.summary()["auc"], 4)
            for name, value in single.model.state_dict().items():
                _assert_close(result["model"][name], value)
            assert all(len(fids) <= CACHE_ROWS for fids, _, _ in result["rows"])  # no worker holds a table
        spec = _spec()
        for (fids_2, embeddings_2, state_2), (fids_1, embeddings_1, state_1) in zip(
                _stored_rows(uris[1], spec), _stored_rows(uris[0], spec)):
            assert torch.equal(fids_2, fids_1) and len(fids_1) > 3 * CACHE_ROWS
            _assert_close(embeddings_2, embeddings_1)
            _assert_close(state_2, state_1)
    finally:
        server.stop()
