"""Sparse optimizers against torch's dense ones, FTRL and CowClip against direct formulas, metrics vs scikit-learn."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from schemas.spec_types import OptimizerKind, OptimizerSpec
from trainer.cowclip import cowclip
from trainer.embedding_table import EmbeddingTable
from trainer.metrics import ProgressiveMetrics
from trainer.sparse_optimizers import SparseOptimizer
from trainer.table_config import TableConfig

DIM, ROWS = 4, 30


def _table(optimizer: SparseOptimizer, init: torch.Tensor) -> tuple[EmbeddingTable, torch.Tensor]:
    config = TableConfig(dim=DIM, state_width=SparseOptimizer.state_width(optimizer.spec.kind, DIM),
                         state_init=optimizer.state_init)
    table = EmbeddingTable(config)
    fids = torch.arange(ROWS) + (1 << 48)
    rows = table.lookup_or_insert(fids, 0)
    table.embeddings[rows] = init
    return table, rows


def _batches(seed=0, steps=6):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, ROWS, (12,), generator=g)  # repeated ids, some rows untouched
        yield ids, torch.randn(12, DIM, generator=g)


@pytest.mark.parametrize("kind, torch_optimizer", [
    (OptimizerKind.SGD, lambda p: torch.optim.SGD([p], lr=0.1)),
    (OptimizerKind.ADAGRAD, lambda p: torch.optim.Adagrad([p], lr=0.1, initial_accumulator_value=0.1, eps=1e-10)),
    (OptimizerKind.ADAM, lambda p: torch.optim.SparseAdam([p], lr=0.1, eps=1e-8)),
])
def test_sparse_path_equals_dense_reference(kind, torch_optimizer):
    init = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1))
    spec = OptimizerSpec(kind=kind, lr=0.1, initial_accumulator=0.1, eps=1e-10 if kind is OptimizerKind.ADAGRAD else 1e-8)
    ours = SparseOptimizer(spec)
    table, table_rows = _table(ours, init)
    embedding = torch.nn.Embedding(ROWS, DIM, sparse=kind is OptimizerKind.ADAM)
    embedding.weight.data.copy_(init)
    reference = torch_optimizer(embedding.weight)
    for ids, upstream in _batches():
        # reference: loss = sum(emb(ids) * upstream)
        reference.zero_grad()
        (embedding(ids) * upstream).sum().backward()
        reference.step()
        # ours: gradients summed per unique id, only those rows updated
        unique, inverse = torch.unique(ids, return_inverse=True)
        grads = torch.zeros(len(unique), DIM).index_add_(0, inverse, upstream)
        ours.step(table, table_rows[unique], grads)
    assert torch.allclose(table.embeddings[table_rows], embedding.weight.detach(), atol=1e-5)


def _ftrl_direct(w, z, n, g, alpha, l1, l2, beta=1.0):
    """McMahan et al. (2013), Algorithm 1, one coordinate."""
    sigma = (math.sqrt(n + g * g) - math.sqrt(n)) / alpha
    z += g - sigma * w
    n += g * g
    w = 0.0 if abs(z) <= l1 else -(z - math.copysign(l1, z)) / ((beta + math.sqrt(n)) / alpha + l2)
    return w, z, n


def test_ftrl_matches_a_direct_implementation():
    spec = OptimizerSpec(kind=OptimizerKind.FTRL, lr=0.5, l1=0.05, l2=0.01, initial_accumulator=0.0)
    ours = SparseOptimizer(spec)
    table, table_rows = _table(ours, torch.zeros(ROWS, DIM))
    w = np.zeros((ROWS, DIM)); z = np.zeros((ROWS, DIM)); n = np.zeros((ROWS, DIM))
    for ids, upstream in _batches(seed=3):
        unique, inverse = torch.unique(ids, return_inverse=True)
        grads = torch.zeros(len(unique), DIM).index_add_(0, inverse, upstream)
        ours.step(table, table_rows[unique], grads)
        for row, grad in zip(unique.tolist(), grads.tolist()):
            for k in range(DIM):
                w[row, k], z[row, k], n[row, k] = _ftrl_direct(w[row, k], z[row, k], n[row, k], grad[k], 0.5, 0.05, 0.01)
    assert np.allclose(table.embeddings[table_rows].numpy(), w, atol=1e-5)
    assert (table.embeddings[table_rows] == 0).any()  # l1 keeps some weights exactly at zero


def test_cowclip_matches_the_formula_per_row_with_repeated_ids():
    g = torch.Generator().manual_seed(5)
    ids = torch.tensor([0, 1, 1, 2, 2, 2, 3])
    weights = torch.randn(4, DIM, generator=g)
    weights[3] = 0.0  # ||w|| = 0: the floor min_clip applies
    per_occurrence = torch.randn(len(ids), DIM, generator=g) * 5
    unique, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    grads = torch.zeros(len(unique), DIM).index_add_(0, inverse, per_occurrence)
    clipped = cowclip(grads, weights[unique], counts, ratio=1.0, min_clip=1e-3)
    for j in range(len(unique)):
        clip = counts[j].item() * max(1.0 * weights[unique[j]].norm().item(), 1e-3)
        norm = grads[j].norm().item()
        expected = grads[j] * min(1.0, clip / norm)
        assert torch.allclose(clipped[j], expected, atol=1e-6)
    assert clipped[3].norm().item() == pytest.approx(1e-3, rel=1e-5)


def test_progressive_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    logits = rng.normal(-1.0, 1.5, 20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-logits))).astype(int)
    weights = np.where(labels == 1, 1.0, 1 / 0.25)  # negatives kept at rate 0.25
    metrics = ProgressiveMetrics()
    for part in np.array_split(np.arange(20_000), 7):
        metrics.update(logits[part], labels[part], weights[part])
    p = 1 / (1 + np.exp(-logits))
    assert metrics.auc == pytest.approx(roc_auc_score(labels, p, sample_weight=weights), abs=1e-4)
    assert metrics.logloss == pytest.approx(log_loss(labels, p, sample_weight=weights), rel=1e-9)
    assert metrics.calibration == pytest.approx((weights * p).sum() / (weights * labels).sum(), rel=1e-9)


@pytest.mark.parametrize("kind", ["deepfm", "wide_deep", "dcn", "dcnv2", "dnn"])
def test_models_from_spec_learn_a_simple_rule(kind):
    """Each model fits a click rule on one slot's embedding (a smoke test that gradients flow)."""
    from schemas.spec import parse_spec
    from trainer.models import CTRModel

    spec = parse_spec({"name": "m", "events": {"impression": "movielens_impression", "action": "action"},
                       "defaults": {"dim": 4},
                       "slots": [{"name": "user", "source": "user_id"}, {"name": "item", "source": "item_id"}],
                       "dense": [{"name": "age", "source": "age"}], "labels": {"actions": ["like"]},
                       "model": {"kind": kind, "hidden_units": [16, 8], "cross_layers": 2}})
    torch.manual_seed(0)
    model = CTRModel.from_spec(spec)
    emb = torch.randn(256, 2, 4)
    wide, dense = torch.zeros(256), torch.randn(256, 1)
    labels = (emb[:, 0, 0] > 0).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    first = None
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(emb, wide, dense), labels)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    assert model(emb, wide, dense).shape == (256,)


def test_windowed_metrics_equal_progressive_metrics_per_window_and_count_late_examples():
    from trainer.metrics import ProgressiveMetrics, WindowedMetrics

    rng = np.random.default_rng(3)
    times = np.sort(rng.integers(0, 10_000, 3_000))
    labels = (rng.random(3_000) < 0.3).astype(float)
    logits = rng.normal(size=3_000) + labels
    weights = np.where(labels > 0, 1.0, 2.0)
    windows = WindowedMetrics(window_ms=1_000)
    rows = []
    for start in range(0, 3_000, 250):  # batches in time order, rows closing as data time passes
        part = slice(start, start + 250)
        windows.update(logits[part], labels[part], weights[part], times[part])
        rows += windows.close_until(int(times[part].max()))
    windows.update(logits[:5], labels[:5], weights[:5], times[:5])  # window 0 closed long ago
    rows += windows.flush()
    assert windows.late_examples == 5
    assert [row["window_start_ms"] for row in rows] == [w * 1_000 for w in range(10)]
    for row in rows:
        mask = (times // 1_000) == row["window_start_ms"] // 1_000
        reference = ProgressiveMetrics(bins=1 << 12)
        reference.update(logits[mask], labels[mask], weights[mask])
        assert row == {"window_start_ms": row["window_start_ms"], "window_ms": 1_000, **reference.summary()}
