"""Sparse optimizers (trainer.sparse_optimizers) against torch's dense ones, FTRL against a direct formula."""
import math

import numpy as np
import pytest
import torch

from schemas.spec_types import OptimizerKind, OptimizerSpec
from trainer.embedding_table import EmbeddingTable
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
