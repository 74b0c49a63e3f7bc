"""Sparse optimizers: update only the rows a batch touched, with their state kept in the table.

Each optimizer reads and writes ``table.embeddings[rows]`` and ``table.state[rows]`` (the state
floats per row are ``state_width(dim)``) and flags the rows touched for the next delta. Rows
are unique; gradients are summed per row beforehand. Formulas (per element, ``g`` the gradient
plus ``l2 * w``):

* SGD:     ``w -= lr * g``
* Adagrad: ``a += g^2``; ``w -= lr * g / (sqrt(a) + eps)``  (torch.optim.Adagrad)
* Adam:    lazy Adam (torch.optim.SparseAdam): ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``
  on touched rows only; ``w -= lr * m_hat / (sqrt(v_hat) + eps)`` with the bias corrections of
  the global step ``t``: ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``
* FTRL-Proximal (McMahan et al. 2013), with ``alpha = lr``, ``beta = 1``:
  ``s = (sqrt(n + g^2) - sqrt(n)) / alpha``; ``z += g - s w``; ``n += g^2``;
  ``w = 0 if |z| <= l1 else -(z - sign(z) l1) / ((beta + sqrt(n)) / alpha + l2)``
"""
from __future__ import annotations

import math

import torch

from schemas.spec_types import STATE_FLOATS_PER_DIM, OptimizerKind, OptimizerSpec

FTRL_BETA = 1.0


class SparseOptimizer:
    def __init__(self, spec: OptimizerSpec):
        self.spec = spec
        self.steps = 0

    @staticmethod
    def state_width(kind: OptimizerKind, dim: int) -> int:
        """State floats per row: ``dim`` times the spec's ``STATE_FLOATS_PER_DIM`` of the kind."""
        return STATE_FLOATS_PER_DIM[kind] * dim

    @property
    def state_init(self) -> float:
        """Initial value of every state float (Adagrad's / FTRL's accumulator start)."""
        return self.spec.initial_accumulator if self.spec.kind in (OptimizerKind.ADAGRAD, OptimizerKind.FTRL) else 0.0

    @torch.no_grad()
    def step(self, table, rows: torch.Tensor, grads: torch.Tensor, grad_squares: torch.Tensor | None = None) -> None:
        """Apply one update to ``rows`` (unique, all >= 0) of ``table`` given their gradients.

        ``grad_squares`` (Adagrad, FTRL): the sum over the batch's examples of each example's
        squared gradient, accumulated in place of ``g^2`` of the summed gradient - what the
        same examples one at a time would accumulate."""
        self.steps += 1
        if len(rows) == 0:
            return
        spec, dim = self.spec, grads.shape[1]
        w = table.embeddings.index_select(0, rows)
        state = table.state.index_select(0, rows) if table.state.shape[1] else None
        kind = spec.kind
        if kind is OptimizerKind.FTRL:
            g = grads
            z, n = state[:, :dim], state[:, dim:]
            squares = g * g if grad_squares is None else grad_squares
            sigma = (torch.sqrt(n + squares) - torch.sqrt(n)) / spec.lr
            z = z + g - sigma * w
            n = n + squares
            w = torch.where(z.abs() <= spec.l1, torch.zeros_like(z),
                            -(z - torch.sign(z) * spec.l1) / ((FTRL_BETA + torch.sqrt(n)) / spec.lr + spec.l2))
            state = torch.cat([z, n], dim=1)
        else:
            g = grads + spec.l2 * w if spec.l2 else grads
            if kind is OptimizerKind.SGD:
                w = w - spec.lr * g
            elif kind is OptimizerKind.ADAGRAD:
                state = state + (g * g if grad_squares is None else grad_squares)
                w = w - spec.lr * g / (torch.sqrt(state) + spec.eps)
            elif kind is OptimizerKind.ADAM:
                m = spec.beta1 * state[:, :dim] + (1 - spec.beta1) * g
                v = spec.beta2 * state[:, dim:] + (1 - spec.beta2) * g * g
                step_size = spec.lr * math.sqrt(1 - spec.beta2 ** self.steps) / (1 - spec.beta1 ** self.steps)
                w = w - step_size * m / (torch.sqrt(v) + spec.eps * math.sqrt(1 - spec.beta2 ** self.steps))
                state = torch.cat([m, v], dim=1)
        table.embeddings.index_copy_(0, rows, w)
        if state is not None:
            table.state.index_copy_(0, rows, state)
        table.mark_touched(rows)
