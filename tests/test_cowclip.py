"""CowClip (trainer.cowclip) against its formula, per row with repeated ids."""
import pytest
import torch

from trainer.cowclip import cowclip

DIM = 4


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
