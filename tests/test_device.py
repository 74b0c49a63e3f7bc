"""The same code on an accelerator: table, optimizers, snapshots and the trainer on CUDA agree
with the CPU. Skipped where no CUDA device is present (CI); run on a GPU machine with
``python -m pytest tests/test_device.py``."""
import numpy as np
import pytest
import torch

from schemas.spec_types import OptimizerKind, OptimizerSpec
from trainer.embedding_table import EmbeddingTable
from trainer.sparse_optimizers import SparseOptimizer
from trainer.table_config import SlotPolicy, TableConfig
from trainer.table_snapshot import load_table, save_table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

POLICIES = {1: SlotPolicy(), 2: SlotPolicy(expire_after_ms=500), 3: SlotPolicy(min_count=3)}


def _config(device, **overrides):
    return TableConfig(**{**dict(dim=4, state_width=4, state_init=0.1, slots=POLICIES, initial_buckets=4,
                                 initial_rows=4, device=device), **overrides})


def _stream(seed=0, batches=60):
    rng = np.random.default_rng(seed)
    for step in range(batches):
        slots = rng.integers(1, 4, 2_000)
        values = rng.zipf(1.3, 2_000) % 5_000
        yield torch.from_numpy((slots << 48) | values), step * 50


def _present(table, universe):
    """Fids held by the table, or by its backing store for a cache."""
    held = (table.lookup(universe.to(table.config.device)) >= 0).cpu()
    if table.store is not None:
        held |= table.store.lookup(universe) >= 0
    return set(universe[held].tolist())


@pytest.mark.parametrize("cached", [False, True], ids=["table", "cache-over-host-store"])
def test_cuda_table_holds_the_same_fids_and_rows_as_the_cpu_table(cached):
    tables = {}
    for device in ("cpu", "cuda"):
        store = EmbeddingTable(_config("cpu")) if cached else None
        tables[device] = EmbeddingTable(_config(device, **({"max_rows": 3_000} if cached else {})), store=store)
    universe = torch.arange(5_000).repeat(3) | (torch.arange(1, 4).repeat_interleave(5_000) << 48)
    for fids, time_ms in _stream():
        for device, table in tables.items():
            unique, counts = torch.unique(fids.to(device), return_counts=True)
            rows = table.lookup_or_insert(unique, time_ms, counts)
            admitted = rows >= 0  # write a value that depends on the fid only
            table.embeddings[rows[admitted]] = (unique[admitted] % 977).to(torch.float32).unsqueeze(1).expand(-1, 4)
            table.mark_touched(rows[admitted])
            table.expire(time_ms)
        assert _present(tables["cpu"], universe) == _present(tables["cuda"], universe)
    if not cached:  # which rows a cache keeps on ties of last-seen time may differ
        probe = universe[:5_000]
        cpu = tables["cpu"].gather(tables["cpu"].lookup(probe))
        gpu = tables["cuda"].gather(tables["cuda"].lookup(probe.cuda())).cpu()
        assert torch.equal(cpu, gpu)
        deltas = {device: table.take_delta() for device, table in tables.items()}
        assert set(deltas["cpu"].fids.tolist()) == set(deltas["cuda"].fids.cpu().tolist())


def test_cuda_table_snapshot_loads_on_the_cpu(tmp_path):
    table = EmbeddingTable(_config("cuda"))
    for fids, time_ms in _stream(batches=10):
        unique, counts = torch.unique(fids.cuda(), return_counts=True)
        table.lookup_or_insert(unique, time_ms, counts)
    save_table(table, tmp_path / "t.arrow")
    back = load_table(tmp_path / "t.arrow", device="cpu")
    universe = torch.arange(5_000).repeat(3) | (torch.arange(1, 4).repeat_interleave(5_000) << 48)
    assert _present(back, universe) == _present(table, universe)
    probe = universe[:5_000]
    assert torch.equal(back.gather(back.lookup(probe)), table.gather(table.lookup(probe.cuda())).cpu())


@pytest.mark.parametrize("kind", list(OptimizerKind))
def test_sparse_optimizer_step_on_cuda_equals_cpu(kind):
    spec = OptimizerSpec(kind=kind, lr=0.05, l2=1e-4)
    results = []
    for device in ("cpu", "cuda"):
        optimizer = SparseOptimizer(spec)
        table = EmbeddingTable(TableConfig(dim=8, state_width=SparseOptimizer.state_width(kind, 8),
                                           state_init=optimizer.state_init, device=device, seed=1))
        rows = table.lookup_or_insert(torch.arange(1, 101, device=device), 0)
        table.embeddings[rows] = torch.linspace(-1, 1, 800, device=device).view(100, 8)
        generator = torch.Generator().manual_seed(7)
        for _ in range(5):
            grads = torch.randn(100, 8, generator=generator).to(device)
            optimizer.step(table, rows, grads)
        results.append(table.gather(rows).cpu())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_trainer_on_cuda_learns_as_on_the_cpu():
    from schemas.spec import load_spec
    from trainer.online import OnlineTrainer
    from transforms.log_examples import synthetic_examples

    spec = load_spec("synthetic")
    examples = synthetic_examples(spec, 30_000, seed=2)
    summaries = {}
    for device in ("cpu", "cuda"):
        trainer = OnlineTrainer(spec, device=device)
        summaries[device] = trainer.train(examples, batch_size=1_024)
        for group in trainer.groups:
            assert group.table.embeddings.device.type == device
        assert next(trainer.model.parameters()).device.type == device
    assert summaries["cuda"]["examples"] == summaries["cpu"]["examples"]
    assert summaries["cuda"]["auc"] > 0.6
    assert summaries["cuda"]["auc"] == pytest.approx(summaries["cpu"]["auc"], abs=0.01)
