"""The sharded trainer (trainer.sharded): K=2 workers in lockstep over gloo end with the model of
one worker trained on the global batch - dense weights, every embedding row and progressive AUC."""
from __future__ import annotations

import dataclasses
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp

from schemas.spec import load_spec
from trainer.sharded import owner_of

PER_WORKER_BATCH = 64


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float rounding: the difference within 1e-5 of the tensor's norm, and every element
    within 1e-4 (sums in another order differ in the last bits, and Adam's normalised step
    enlarges that where a gradient is ~0)."""
    assert float((actual - expected).norm()) <= 1e-5 * float(expected.norm()) + 1e-12, (
        float((actual - expected).norm()) / float(expected.norm()))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-12)


def _spec():
    spec = load_spec("synthetic")
    training = dataclasses.replace(spec.training, batch_size=2 * PER_WORKER_BATCH, sequential_updates=False)
    return dataclasses.replace(spec, training=training)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, world: int, port: int, examples_path: str, out: str) -> None:
    import torch.distributed as dist

    from trainer.sharded import Collectives, ShardedTrainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        trainer = ShardedTrainer(_spec(), Collectives())
        examples = pq.read_table(examples_path)
        prepared = trainer.prepare(examples)
        batch = world * PER_WORKER_BATCH
        for start in range(0, prepared.n, batch):
            trainer.train_prepared(prepared, start, min(start + batch, prepared.n))
        rows = [group.table.all_rows() for group in trainer.groups]
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
    from trainer.online import OnlineTrainer

    world = 2
    context = mp.get_context("spawn")
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, world, port, str(examples_file), str(tmp_path)))
               for rank in range(world)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(timeout=300)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()  # (by its process id)
                worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0]

    single = OnlineTrainer(_spec())
    expected_metrics = single.train(pq.read_table(examples_file), batch_size=world * PER_WORKER_BATCH)
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
