"""Sequential sparse updates within a batch: what training the batch one example at a time
would do to the embedding rows and to the batch's own scores, computed in parallel.

Online learners that update after every example (Vowpal Wabbit, FTRL) let the first ratings of a
session inform the next ones; a batch scores and trains its examples together, so it cannot -
and small batches that could are slow. This module keeps the batch and recovers the sequence.

Examples ``1..n`` of a batch in training order; ``z_i`` the logit of example ``i``;
``g_i = sigmoid(z_i - log r_i) - y_i`` the gradient of its loss with respect to ``z_i``;
``J_i(f) = d z_i / d row_f`` (the model's Jacobian at the batch's start, one backward pass). The
per-example gradient of row ``f`` is ``G_i(f) = g_i J_i(f)`` (``+ l2 row_f``) and, example by
example, with the rows' Adagrad accumulators ``a_f``:

    A_i(f) = a_f + sum_{j <= i, f in j} G_j(f)^2
    step_i(f) = -lr G_i(f) / (sqrt(A_i(f)) + eps)          (SGD: -lr G_i(f))
    z_i = z_i^0 + sum_{f in i} < sum_{j < i, f in j} step_j(f), J_i(f) >

``z^0`` is the score of the batch's starting model. The last line couples the examples (``g_j``
depends on ``z_j``): with ``K[i, j] = sum_{f in i, j} <J_i(f), rate_j(f) J_j(f)>`` for ``j < i``
(``rate = -lr / (sqrt(A) + eps)``) it reads ``z = z^0 + K g(z)``, a strictly lower-triangular
system, solved by Newton steps ``z <- z - (I - K diag(g'(z)))^-1 (z - z^0 - K g(z))`` (one
triangular solve of batch x batch each; ``K`` is built from the pairs of occurrences of each
fid, so its cost grows with the pairs, not with the rows). It is exact at convergence for a model
linear in its rows (tested); ``NEWTON_STEPS = 1`` is what training uses. The rows then move by
``sum_i step_i(f)`` and the accumulators by ``sum_i G_i(f)^2``; the scores ``z`` (progressive
validation: example ``i`` has seen only the examples before it) are what the metrics record.
The dense weights train on the batch as a batch (their gradient at ``z^0``, from the same
backward pass that gives ``J``).

The Jacobian is frozen at the batch's start, which holds while the batch's steps are small against
the model's curvature: measured on MovieLens-100K the AUC falls slowly with the batch (64: 0.7637,
128: 0.7627), so ``TrainingSpec`` applies this to batches up to 128 by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: Newton steps on the batch's coupled scores (one is within 0.0005 AUC of three on MovieLens).
NEWTON_STEPS = 1


@dataclass
class SequentialRows:
    """One table's part of a batch: its occurrences sorted by (fid, example)."""

    fid_index: torch.Tensor  # [occurrences] index of the occurrence's distinct fid, sorted
    example: torch.Tensor  # [occurrences] the example, ascending within a fid
    jacobian: torch.Tensor  # [occurrences, width] d logit / d row (zero for a fid without a row)
    distinct: int  # distinct fids (every index below appears in fid_index)
    lr: float
    eps: float = 1e-8
    accumulator: torch.Tensor | None = None  # [distinct, width] Adagrad accumulators before the batch; None: SGD
    weights: torch.Tensor | None = None  # [distinct, width] rows before the batch, for l2
    l2: float = 0.0

    def __post_init__(self):
        starts = torch.ones(len(self.fid_index), dtype=torch.bool, device=self.fid_index.device)
        starts[1:] = self.fid_index[1:] != self.fid_index[:-1]
        first = torch.nonzero(starts).squeeze(1)
        segment = torch.cumsum(starts, 0) - 1
        self._first = first.index_select(0, segment)  # each occurrence's fid's first occurrence
        # Every (earlier, later) pair of occurrences of one fid: the later example's score depends
        # on the earlier example's step through that fid.
        position = torch.arange(len(starts), device=starts.device)
        later = torch.bincount(segment, minlength=len(first)).index_select(0, segment) - (position - self._first) - 1
        self._earlier = torch.repeat_interleave(position, later)
        offset = (torch.arange(len(self._earlier), device=starts.device)
                  - torch.repeat_interleave(torch.cumsum(later, 0) - later, later))
        self._later = self._earlier + 1 + offset
        self._accumulated = (None if self.accumulator is None
                             else self.accumulator.index_select(0, self.fid_index))
        self._decay = self.l2 * self.weights.index_select(0, self.fid_index) if self.l2 else None

    def prefix(self, values: torch.Tensor) -> torch.Tensor:
        """Inclusive running sums of ``values`` [occurrences, width] within each fid."""
        total = torch.cumsum(values, 0)
        return total - (total - values).index_select(0, self._first)

    def gradients(self, example_grad: torch.Tensor) -> torch.Tensor:
        """``G`` per occurrence [occurrences, width] for the examples' loss gradients ``g``."""
        grad = example_grad.index_select(0, self.example).unsqueeze(1) * self.jacobian
        return grad if self._decay is None else grad + self._decay

    def rates(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(step per unit of gradient per occurrence, running squared gradients) given ``G``."""
        if self._accumulated is None:
            return torch.full_like(grad, -self.lr), grad * grad
        squares = self.prefix(grad * grad)
        return -self.lr / (torch.sqrt(self._accumulated + squares) + self.eps), squares

    def coupling(self, rate: torch.Tensor, n: int) -> torch.Tensor:
        """``K`` [examples, examples]: ``K[i, j] = sum_f <J_i(f), rate_j(f) J_j(f)>`` over fids
        shared by an earlier ``j`` and a later ``i`` - the change of ``z_i`` per unit of ``g_j``."""
        scaled = rate * self.jacobian
        dots = (self.jacobian.index_select(0, self._later) * scaled.index_select(0, self._earlier)).sum(dim=1)
        later, earlier = self.example.index_select(0, self._later), self.example.index_select(0, self._earlier)
        dots = torch.where(later > earlier, dots, 0.0)  # an id twice in one example is not "earlier"
        return torch.zeros(n, n, device=dots.device).index_put_((later, earlier), dots, accumulate=True)

    def totals(self, example_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed steps, summed squared gradients) per distinct fid [distinct, width]."""
        grad = self.gradients(example_grad)
        rate, _ = self.rates(grad)
        return self._per_fid(rate * grad), self._per_fid(grad * grad)

    def _per_fid(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.distinct, values.shape[1], device=values.device).index_add_(0, self.fid_index, values)


def sequential_logits(logits: torch.Tensor, labels: torch.Tensor, log_rate: torch.Tensor,
                      tables: list[SequentialRows], newton_steps: int = NEWTON_STEPS):
    """(scores ``z`` of the batch as if trained example by example, per table the totals of
    ``SequentialRows.totals``); ``logits`` are ``z^0`` [examples]."""
    n = len(logits)
    scores = logits
    identity = torch.eye(n, device=logits.device)
    for _ in range(newton_steps):
        probability = torch.sigmoid(scores - log_rate)
        example_grad = probability - labels
        coupling = torch.zeros(n, n, device=logits.device)
        for table in tables:
            coupling += table.coupling(table.rates(table.gradients(example_grad))[0], n)
        residual = scores - logits - coupling @ example_grad
        system = identity - coupling * (probability * (1 - probability)).unsqueeze(0)
        scores = scores - torch.linalg.solve_triangular(system, residual.unsqueeze(1), upper=False,
                                                         unitriangular=True).squeeze(1)
    example_grad = torch.sigmoid(scores - log_rate) - labels
    return scores, [table.totals(example_grad) for table in tables]
