"""The online trainer, engine-free: Example batches in, progressive metrics out.

An Example table is converted once (``prepare``) and trained in slices of ``batch_size``. Per
batch: fids -> distinct per table -> their rows (lookup-or-insert: event time, counts, frequency
filter; the index is searched once per window of coming fids) -> pooled embeddings per slot (sum)
and wide sums -> model -> loss ``BCE(logit - log(sample_rate), label)`` summed over the batch, so
the logit stays calibrated to unsampled traffic and every example moves its rows by a full
gradient -> one backward pass: the dense weights' gradient and each example's gradient with
respect to its pooled rows. Then either

* sequential in-batch updates (``trainer.in_batch``, small batches by default): the batch's
  scores and row steps as if its examples were trained one at a time (Adagrad/SGD slots), or
* a plain batch update: CowClip on deep-embedding gradients (if enabled), then the sparse
  optimizer on the touched rows;

and the dense optimizer. Progressive validation: the metrics record each example's score before
it is trained on (with sequential updates, after the batch's earlier examples), negatives
weighted 1/r. Expiry sweeps run on data time.

The tables, their slot groups and the forward pass are ``trainer.ranking_model.RankingModel``
(serving holds the same model); CowClip clips the deep part of a row only, never the wide weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from schemas.spec_types import FeatureSpec, OptimizerKind, OptimizerSpec
from trainer.cowclip import cowclip
from trainer.embedding_table import EmbeddingTable
from trainer.in_batch import NEWTON_STEPS, SequentialRows, sequential_logits
from trainer.metrics import ProgressiveMetrics, RecordingMetrics, WindowedMetrics, metric_weights
from trainer.ranking_model import GroupFids, PreparedExamples, RankingModel, ResolvedWindow, TableGroup
from trainer.rows import max_per_group

#: Expiry sweeps (each scans a table) run every hour of data time, or every 1/100 of the shortest
#: ``expire_after`` if longer: a row lives at most 1 % (or an hour) past its expiry.
EXPIRE_EVERY_MS = 3_600_000
EXPIRE_RESOLUTION = 100


#: Occurrences whose rows are found in one index search ahead of training them (per table).
RESOLVE_AHEAD_OCCURRENCES = 16_384


@dataclass
class _Touched:
    """What a batch read from one group's table, for the update after the backward pass."""

    group: TableGroup
    rows: torch.Tensor  # [unique fids] rows (-1: held back by the frequency filter)
    inverse: torch.Tensor  # [occurrences] index into rows
    target: torch.Tensor  # [occurrences] pooled row of each occurrence
    example: torch.Tensor  # [occurrences] example of each occurrence
    counts: torch.Tensor  # [unique fids] occurrences in the batch


def occurrence_gradients(target: torch.Tensor, example: torch.Tensor, inverse: torch.Tensor, fids: int,
                         pooled_grad: torch.Tensor, wide_grad: torch.Tensor,
                         with_squares: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum, sum of squares if ``with_squares``) over each fid's occurrences of the occurrence's
    gradient [fids, dim + 1]: the gradient of its pooled slot (``target``) beside that of its
    example's wide sum."""
    grads = torch.cat([pooled_grad.index_select(0, target), wide_grad.index_select(0, example).unsqueeze(1)], dim=1)
    summed = torch.zeros(fids, grads.shape[1], device=grads.device).index_add_(0, inverse, grads)
    if not with_squares:
        return summed, None
    return summed, torch.zeros_like(summed).index_add_(0, inverse, grads * grads)


def _dense_optimizer(spec: OptimizerSpec, parameters) -> torch.optim.Optimizer:
    """torch's fused implementations: one kernel per step for all parameters (the per-tensor
    loop was a fifth of a small batch's step)."""
    if spec.kind is OptimizerKind.ADAM:
        return torch.optim.Adam(parameters, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps,
                                weight_decay=spec.l2, fused=True)
    if spec.kind is OptimizerKind.ADAGRAD:
        return torch.optim.Adagrad(parameters, lr=spec.lr, weight_decay=spec.l2,
                                   initial_accumulator_value=spec.initial_accumulator, fused=True)
    if spec.kind is OptimizerKind.SGD:
        return torch.optim.SGD(parameters, lr=spec.lr, weight_decay=spec.l2, fused=True)
    raise ValueError(f"dense optimizer {spec.kind.value!r} is not supported (use adam, adagrad or sgd)")


class OnlineTrainer:
    #: The workers a sharded trainer trains with (``trainer.sharded.Collectives``); None: one worker.
    comm = None

    def __init__(self, spec: FeatureSpec, device: str = "cpu", seed: int = 0, store: str | None = None):
        """``store`` (default: the spec's ``store``): a ``redis://`` URI - each table is then a
        bounded cache (``cache_rows``) in front of rows kept in Redis (``trainer.redis_store``)."""
        self.spec, self.device = spec, torch.device(device)
        self.store_uri = store if store is not None else spec.store
        self.ranking = RankingModel(spec, device, seed, optimizer_state=True, store=self.store_uri)
        self.groups, self.model = self.ranking.groups, self.ranking.net
        self.sequential_updates = spec.training.uses_sequential_updates
        self.newton_steps = NEWTON_STEPS
        self.dense_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.dense_optimizer = _dense_optimizer(spec.training.dense_optimizer, self.model.parameters())
        self._metrics = ProgressiveMetrics()
        self._pending_scores: list = []  # (logits, start, stop, prepared) of batches not yet in the metrics
        self.window_metrics = WindowedMetrics(spec.training.metrics_window_ms)
        self.dense_lr = [group["lr"] for group in self.dense_optimizer.param_groups]
        self.dim, self.num_slots = self.ranking.dim, self.ranking.num_slots
        self.batches = 0
        self.data_time_ms = 0
        self.last_expiry_ms = 0
        lifetimes = [slot.expire_after_ms for slot in spec.slots if slot.expire_after_ms is not None]
        self.expire_every_ms = max(EXPIRE_EVERY_MS, min(lifetimes, default=0) // EXPIRE_RESOLUTION)
        self.unknown_slot_fids = 0

    def prepare(self, examples: pa.Table) -> PreparedExamples:
        """The columns of ``examples`` laid out for training in slices (``RankingModel.prepare``);
        counts the fids of slots the spec does not have."""
        prepared = self.ranking.prepare(examples)
        self.unknown_slot_fids += prepared.unknown_slot_fids
        return prepared

    def _pool(self, prepared: PreparedExamples, start: int, stop: int):
        """Pooled embeddings and wide sums of examples ``start:stop`` (``RankingModel.pool``), and
        per group the (rows, occurrences) that training updates. New fids are inserted (frequency
        filter, last-seen time, counts)."""
        used = []

        def read_rows(index: int, fids_of: GroupFids, lo: int, hi: int):
            group = self.groups[index]
            rows, inverse, counts = self._rows_for_training(group.table, fids_of, lo, hi)
            weights = (group.table.gather(rows) if group.table.sketch is not None  # zeros if filtered
                       else group.table.embeddings.index_select(0, rows))  # [unique, dim + 1]
            used.append(_Touched(group, rows, inverse, fids_of.target[lo:hi] - start * self.num_slots,
                                 fids_of.example[lo:hi] - start, counts))
            return weights, inverse

        pooled, wide = self.ranking.pool(prepared, start, stop, read_rows)
        return pooled, wide, used

    def _rows_for_training(self, table: EmbeddingTable, fids_of: GroupFids, lo: int, hi: int):
        """(rows, inverse, counts) of the distinct fids of occurrences ``lo:hi`` - exactly what
        ``table.lookup_or_insert`` of them gives - with the table's index searched once per window
        of coming occurrences (``ResolvedWindow``) instead of once per batch."""
        window = fids_of.resolved
        if (window is None or lo < window.start or hi > window.stop or window.rows_freed != table.rows_freed):
            stop = max(hi, min(len(fids_of.fids), lo + RESOLVE_AHEAD_OCCURRENCES))
            distinct, window_inverse = torch.unique(fids_of.fids[lo:stop], return_inverse=True)
            window = fids_of.resolved = ResolvedWindow(lo, stop, distinct, window_inverse, table.lookup(distinct),
                                                        table.rows_freed)
        ids, inverse, counts = torch.unique(window.inverse[lo - window.start:hi - window.start],
                                            return_inverse=True, return_counts=True)
        times = max_per_group(fids_of.times[lo:hi], inverse, len(ids))
        rows = window.rows.index_select(0, ids)
        if bool((rows < 0).any()):  # new (or filtered) fids: the table inserts what it admits
            rows = table.lookup_or_insert(window.fids.index_select(0, ids), times, counts, rows=rows)
            if table.rows_freed == window.rows_freed:
                window.rows.index_copy_(0, ids, rows)
        else:
            table.record_hits(rows, times, counts)
        return rows, inverse, counts

    def train_batch(self, examples: pa.Table) -> dict:
        """Score the batch (progressive metrics), then train on it; returns the batch's loss."""
        prepared = self.prepare(examples)
        loss = self.train_prepared(prepared, 0, prepared.n)
        return {"loss": float(loss) / max(prepared.n, 1), "examples": prepared.n}

    def train_prepared(self, prepared: PreparedExamples, start: int, stop: int,
                       unscored: int = 0) -> torch.Tensor:
        """Score examples ``start:stop`` of ``prepared`` (progressive metrics; the first
        ``unscored`` of them are left out of the metrics), then train on them as one batch;
        returns the batch's summed loss (a 0-d tensor: reading it syncs)."""
        n = stop - start
        pooled, wide, used = self._pool(prepared, start, stop)
        pooled.requires_grad_()
        wide.requires_grad_()
        logits = self.ranking.forward(pooled, wide, prepared.dense[start:stop])
        labels, log_rate = prepared.label_tensor[start:stop], prepared.log_rate[start:stop]
        # Summed, not averaged: each example moves its own embedding rows by a full gradient (as
        # in per-example online learning); a mean would shrink sparse updates by the batch size.
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits - log_rate, labels, reduction="sum")
        # One backward pass: the dense weights' gradient (they train on the batch as a batch, at its
        # starting scores) and each example's gradient with respect to its pooled rows.
        grads = torch.autograd.grad(loss, self.dense_parameters + [pooled, wide], allow_unused=True)
        for parameter, grad in zip(self.dense_parameters, grads):
            parameter.grad = grad
        pooled_grad, wide_grad = grads[len(self.dense_parameters):]
        pooled_grad = torch.zeros_like(pooled) if pooled_grad is None else pooled_grad
        wide_grad = torch.zeros_like(wide) if wide_grad is None else wide_grad  # models without a wide part
        sequential = [t for t in used if t.group.sequential] if self.sequential_updates and n > 1 else []
        scores, totals = logits.detach(), []
        if sequential:  # the scores and row steps of training the batch example by example
            example_grad = torch.sigmoid(scores - log_rate) - labels  # d loss / d logit, never 0 in exact arithmetic
            usable = example_grad.abs() > 1e-30
            inverse_grad = torch.where(usable, 1.0 / torch.where(usable, example_grad, 1.0), 0.0)
            jac_pooled = pooled_grad * inverse_grad.repeat_interleave(self.num_slots).unsqueeze(1)
            jac_wide = wide_grad * inverse_grad
            scores, totals = sequential_logits(scores, labels, log_rate,
                                               [self._sequential_rows(t, jac_pooled, jac_wide) for t in sequential],
                                               newton_steps=self.newton_steps)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scores - log_rate, labels, reduction="sum")
        if unscored < n:
            self._pending_scores.append((scores[unscored:], start + unscored, stop, prepared))
        batch_updated = [t for t in used if t not in sequential]
        if batch_updated:
            self._sparse_step(batch_updated, pooled_grad, wide_grad)
        for touched, (steps, squares) in zip(sequential, totals):
            self._apply_sequential(touched, steps, squares)
        self._end_step(prepared, start, stop)
        return loss.detach()

    def _end_step(self, prepared: PreparedExamples, start: int, stop: int) -> None:
        """After the sparse updates of examples ``start:stop``: the dense step (with its linear
        warm-up), the data time, and the expiry sweep when it is due."""
        warmup = self.spec.training.warmup_steps
        if self.batches < warmup:  # linear warm-up of the dense learning rate
            for group, lr in zip(self.dense_optimizer.param_groups, self.dense_lr):
                group["lr"] = lr * (self.batches + 1) / warmup
        self.dense_optimizer.step()
        self.batches += 1
        if stop > start:
            self.data_time_ms = max(self.data_time_ms, int(prepared.times[start:stop].max()))
        if self.data_time_ms - self.last_expiry_ms >= self.expire_every_ms:
            for group in self.groups:
                group.table.expire(self.data_time_ms)
            self.last_expiry_ms = self.data_time_ms

    def _sequential_rows(self, touched: _Touched, jac_pooled: torch.Tensor,
                         jac_wide: torch.Tensor) -> SequentialRows:
        """One table's occurrences for ``trainer.in_batch``, with ``J`` = [d logit / d pooled slot,
        d logit / d wide sum] of each occurrence's example."""
        table, spec = touched.group.table, touched.group.optimizer.spec
        order = torch.argsort(touched.inverse, stable=True)  # by fid, each fid's examples in order
        fid_index, example = touched.inverse[order], touched.example[order]
        jacobian = torch.cat([jac_pooled.index_select(0, touched.target[order]),
                              jac_wide.index_select(0, example).unsqueeze(1)], dim=1)
        rows = touched.rows.clamp(min=0)
        if table.sketch is not None:  # a filtered fid has no row: it neither moves nor moves a score
            jacobian = jacobian * (touched.rows >= 0).index_select(0, fid_index).unsqueeze(1)
        accumulator = table.state.index_select(0, rows) if spec.kind is OptimizerKind.ADAGRAD else None
        weights = table.embeddings.index_select(0, rows) if spec.l2 else None
        return SequentialRows(fid_index, example, jacobian, len(rows), spec.lr, spec.eps, accumulator, weights, spec.l2)

    @torch.no_grad()
    def _apply_sequential(self, touched: _Touched, steps: torch.Tensor, squares: torch.Tensor) -> None:
        """Move the rows by their summed in-batch steps, their accumulators by the squares."""
        table, rows = touched.group.table, touched.rows
        if table.sketch is not None:
            admitted = rows >= 0
            rows, steps, squares = rows[admitted], steps[admitted], squares[admitted]
        table.embeddings.index_add_(0, rows, steps)
        if touched.group.optimizer.spec.kind is OptimizerKind.ADAGRAD:
            table.state.index_add_(0, rows, squares)
        table.mark_touched(rows)
        touched.group.optimizer.steps += 1

    def _sparse_step(self, used: list[_Touched], pooled_grad: torch.Tensor, wide_grad: torch.Tensor) -> None:
        """Per touched row: the sum of its occurrences' gradients (an occurrence's gradient is that
        of the pooled slot, or the wide sum, of its example), and of their squares; then
        ``update_rows``."""
        for touched in used:
            grad, squares = occurrence_gradients(touched.target, touched.example, touched.inverse, len(touched.rows),
                                                 pooled_grad, wide_grad, self.takes_squares(touched.group))
            self.update_rows(touched.group, touched.rows, grad, squares, touched.counts)

    def takes_squares(self, group: TableGroup) -> bool:
        """Whether a plain batch step gives ``group``'s optimizer the summed per-example squared
        gradients (``TrainingSpec.per_example_squares``); else it squares the summed gradient."""
        return group.uses_squares and self.spec.training.per_example_squares

    def update_rows(self, group: TableGroup, rows: torch.Tensor, grad: torch.Tensor, squares: torch.Tensor | None,
                    counts: torch.Tensor) -> None:
        """One sparse step on ``rows`` (unique; -1: held back by the frequency filter, no update)
        given their summed gradients [rows, dim + 1], summed squared gradients (where it
        ``takes_squares``; None: the optimizer squares the sum) and occurrence ``counts``: CowClip
        on the deep part if enabled, then the group's sparse optimizer."""
        cow, dim = self.spec.training.cowclip, self.dim
        if cow.enabled:  # the deep part only: wide weights are not clipped
            weights = group.table.gather(rows)
            grad = torch.cat([cowclip(grad[:, :dim], weights[:, :dim], counts, cow.ratio, cow.min_clip),
                              grad[:, dim:]], dim=1)
        if group.table.sketch is not None:
            admitted = rows >= 0  # filtered fids have no row and get no update
            rows, grad = rows[admitted], grad[admitted]
            squares = squares[admitted] if squares is not None else None
        group.optimizer.step(group.table, rows, grad, squares)

    def _fold_metrics(self) -> None:
        """Add the scores of trained batches to the progressive metrics (done lazily: a batch's
        scores are final when it is scored, and one update per many batches is cheaper)."""
        if not self._pending_scores:
            return
        pending, self._pending_scores = self._pending_scores, []
        scores = torch.cat([logits for logits, *_ in pending]).cpu().numpy()
        labels = np.concatenate([p.labels[a:b] for _, a, b, p in pending])
        rates = np.concatenate([p.rates[a:b] for _, a, b, p in pending])
        times = np.concatenate([p.times[a:b] for _, a, b, p in pending])
        weights = metric_weights(labels, rates)
        self._metrics.update(scores, labels, weights)
        self.window_metrics.update(scores, labels, weights, times)

    def record_scores(self) -> RecordingMetrics:
        """Restart the progressive metrics as ``RecordingMetrics``: from now on they keep every
        score, label and weight in training order (per-example comparisons, exact AUCs)."""
        self._fold_metrics()
        self._metrics = RecordingMetrics()
        return self._metrics

    @property
    def metrics(self) -> ProgressiveMetrics:
        self._fold_metrics()
        return self._metrics

    def closed_windows(self, flush: bool = False) -> list[dict]:
        """Rows of progressive metrics per event-time window that are now final (all if ``flush``)."""
        self._fold_metrics()
        return self.window_metrics.flush() if flush else self.window_metrics.close_until(self.data_time_ms)

    def train(self, examples: pa.Table, batch_size: int | None = None) -> dict:
        """Train on ``examples`` in order, in batches; returns the progressive metrics so far."""
        batch_size = batch_size or self.spec.training.batch_size
        prepared = self.prepare(examples)
        for start in range(0, prepared.n, batch_size):
            self.train_prepared(prepared, start, min(start + batch_size, prepared.n))
        return self.metrics.summary()

    def predict_logits(self, examples: pa.Table) -> np.ndarray:
        """Logits calibrated to unsampled traffic, without inserting or updating anything."""
        return self.ranking.predict_logits(examples)

    def predict_features(self, fids: pa.ListArray, dense: pa.ListArray) -> np.ndarray:
        """Logits for extracted features (``FeatureExtractor.extract``): what serving computes."""
        return self.ranking.predict_features(fids, dense)

    def write_back(self) -> None:
        """Write every table's touched rows to its backing store (nothing without one)."""
        for group in self.groups:
            group.table.write_back()

    def training_state(self) -> dict:
        """Everything but the tables needed to continue training exactly (for snapshots)."""
        self._fold_metrics()
        return {"model": self.model.state_dict(), "dense_optimizer": self.dense_optimizer.state_dict(),
                "metrics": self._metrics.state_dict(), "window_metrics": self.window_metrics.state_dict(),
                "batches": self.batches, "data_time_ms": self.data_time_ms, "last_expiry_ms": self.last_expiry_ms,
                "unknown_slot_fids": self.unknown_slot_fids,
                "store_tokens": [list(group.table.store.tokens) if _persistent(group.table.store) else []
                                 for group in self.groups]}

    def load_training_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.dense_optimizer.load_state_dict(state["dense_optimizer"])
        self._pending_scores = []
        self._metrics.load_state_dict(state["metrics"])
        self.window_metrics.load_state_dict(state["window_metrics"])
        for key in ("batches", "data_time_ms", "last_expiry_ms", "unknown_slot_fids"):
            setattr(self, key, state[key])
        # the rows the snapshot's cache lacks must still be in the same store
        for index, (group, tokens) in enumerate(zip(self.groups, state.get("store_tokens", []))):
            if _persistent(group.table.store):
                group.table.store.check_identity(tokens, f"the snapshot's table {index}")

    def continue_from(self, other: "OnlineTrainer") -> None:
        """Take over ``other``'s tables (rows with their optimizer state), dense weights, dense
        optimizer state and data time, keeping this trainer's own settings (batch, learning
        rates, CowClip) and fresh metrics: a batch-trained model continues online, in memory.
        The specs must group the slots into the same tables."""
        mine, theirs = [g.slot_ids for g in self.groups], [g.slot_ids for g in other.groups]
        if mine != theirs:
            raise ValueError(f"the trainers group their slots into different tables: {theirs} -> {mine}")
        for group, source in zip(self.groups, other.groups):
            if group.optimizer.spec.kind != source.optimizer.spec.kind:
                raise ValueError(f"slots {group.slot_ids}: {source.optimizer.spec.kind.value} state cannot continue "
                                 f"as {group.optimizer.spec.kind.value}")
            group.table = source.table
        self.model.load_state_dict(other.model.state_dict())
        self.dense_optimizer.load_state_dict(other.dense_optimizer.state_dict())
        for group, lr in zip(self.dense_optimizer.param_groups, self.dense_lr):  # (the state carried its lr)
            group["lr"] = lr
        self.data_time_ms, self.last_expiry_ms = other.data_time_ms, other.last_expiry_ms


def _persistent(store) -> bool:
    """A table's backing store outlives this process (it has identity tokens and a position)."""
    return store is not None and store.persistent
