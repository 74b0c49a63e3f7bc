"""The online trainer, engine-free: Example batches in, progressive metrics out.

Per batch: fids -> unique per table -> lookup-or-insert (event time, counts; frequency filter and
expiry on data time) -> pooled embeddings per slot (sum) and wide weights -> model -> the batch is
scored first (progressive validation, negatives weighted 1/r) -> loss
``BCE(logit - log(sample_rate), label)`` summed over the batch, so the logit stays calibrated to
unsampled traffic and every example moves its rows by a full gradient ->
backward -> CowClip on deep-embedding gradients (if enabled) -> sparse optimizer on touched rows
only -> dense optimizer.

Slots are grouped by optimizer; each group has one table whose rows hold the deep embedding
(``dim`` floats) and the fid's wide weight (one more float), so one index lookup serves both.
The optimizers are element-wise, so the two share a row; CowClip clips the deep part only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from schemas.fids import HASH_BITS, MAX_SLOT_ID
from schemas.spec import FeatureSpec, OptimizerKind, OptimizerSpec
from trainer.cowclip import cowclip
from trainer.embedding_table import EmbeddingTable, TableConfig
from trainer.metrics import ProgressiveMetrics, WindowedMetrics
from trainer.models import CTRModel
from trainer.sparse_optimizers import SparseOptimizer

EXPIRE_EVERY_MS = 3_600_000  # expiry sweep every hour of data time


@dataclass
class _Group:
    slot_ids: list[int]
    table: EmbeddingTable  # rows: [deep embedding (dim) | wide weight (1)]
    optimizer: SparseOptimizer


def _dense_optimizer(spec: OptimizerSpec, parameters) -> torch.optim.Optimizer:
    if spec.kind is OptimizerKind.ADAM:
        return torch.optim.Adam(parameters, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps,
                                weight_decay=spec.l2)
    if spec.kind is OptimizerKind.ADAGRAD:
        return torch.optim.Adagrad(parameters, lr=spec.lr, weight_decay=spec.l2,
                                   initial_accumulator_value=spec.initial_accumulator)
    if spec.kind is OptimizerKind.SGD:
        return torch.optim.SGD(parameters, lr=spec.lr, weight_decay=spec.l2)
    raise ValueError(f"dense optimizer {spec.kind.value!r} is not supported (use adam, adagrad or sgd)")


class OnlineTrainer:
    """``serving=True`` builds the same model and tables without optimizer state (rows hold the
    embedding and wide weight only) for prediction."""

    def __init__(self, spec: FeatureSpec, device: str = "cpu", seed: int = 0, serving: bool = False,
                 store: str | None = None):
        """``store`` (default: the spec's ``store``): a ``redis://`` URI - each table is then a
        bounded cache (``cache_rows``) in front of rows kept in Redis (``trainer.redis_store``)."""
        self.spec, self.device, self.serving = spec, torch.device(device), serving
        self.store_uri = store if store is not None else spec.store
        torch.manual_seed(seed)
        self.slot_position = np.full(MAX_SLOT_ID + 1, -1, dtype=np.int64)
        for position, slot in enumerate(spec.slots):
            self.slot_position[slot.slot_id] = position
        by_optimizer: dict[OptimizerSpec, list] = {}
        for slot in spec.slots:
            by_optimizer.setdefault(slot.optimizer, []).append(slot)
        self.groups = []
        for index, (optimizer, slots) in enumerate(by_optimizer.items()):
            sparse = SparseOptimizer(optimizer)
            width = slots[0].dim + 1
            state_width = 0 if serving else SparseOptimizer.state_width(optimizer.kind, width)
            config = TableConfig.for_slots(slots, state_width=state_width,
                                           state_init=sparse.state_init, device=device, seed=seed + index)
            config = dataclasses.replace(config, dim=width)
            table = EmbeddingTable(config) if self.store_uri is None else self._cached_table(config, index)
            self.groups.append(_Group([s.slot_id for s in slots], table, sparse))
        self.group_of_slot = np.full(MAX_SLOT_ID + 1, -1, dtype=np.int64)
        for index, group in enumerate(self.groups):
            self.group_of_slot[group.slot_ids] = index
        self.model = CTRModel.from_spec(spec).to(self.device)
        self.dense_optimizer = _dense_optimizer(spec.training.dense_optimizer, self.model.parameters())
        self.metrics = ProgressiveMetrics()
        self.window_metrics = WindowedMetrics(spec.training.metrics_window_ms)
        self.dense_lr = [group["lr"] for group in self.dense_optimizer.param_groups]
        self.target = spec.labels.target
        self.dim = spec.slots[0].dim
        self.num_slots = len(spec.slots)
        self.batches = 0
        self.data_time_ms = 0
        self.last_expiry_ms = 0
        self.unknown_slot_fids = 0

    def _columns(self, examples: pa.Table):
        fids = examples.column("fids").combine_chunks()
        offsets = fids.offsets.to_numpy()
        flat = fids.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        example_of = np.repeat(np.arange(examples.num_rows), np.diff(offsets))
        labels_column = examples.column("labels").combine_chunks()
        is_target = (labels_column.keys.to_numpy(zero_copy_only=False) == self.target)
        label_offsets = labels_column.offsets.to_numpy()
        label_rows = np.repeat(np.arange(examples.num_rows), np.diff(label_offsets))
        labels = np.zeros(examples.num_rows)
        labels[label_rows[is_target]] = labels_column.items.to_numpy(zero_copy_only=False)[is_target]
        dense = examples.column("dense").combine_chunks()
        dense_values = dense.values.to_numpy(zero_copy_only=False).reshape(examples.num_rows, -1)
        times = examples.column("impression_time_ms").to_numpy()
        rates = examples.column("sample_rate").to_numpy()
        return flat, example_of, labels, dense_values, times, rates

    def _forward(self, examples: pa.Table, train: bool):
        """Logits of a batch and, when training, the (group, rows, leaf weights, counts) to update.

        Training inserts new fids (frequency filter, last-seen time, counts); prediction only reads.
        """
        flat, example_of, labels, dense_values, times, rates = self._columns(examples)
        logits, used = self._forward_fids(flat, example_of, examples.num_rows, dense_values, times, train)
        return logits, labels, rates, times, used

    def _forward_fids(self, flat, example_of, n: int, dense_values, times, train: bool):
        slots = flat >> HASH_BITS
        position = self.slot_position[slots]
        known = position >= 0
        if train:
            self.unknown_slot_fids += int((~known).sum())
        pooled = torch.zeros(n * self.num_slots, self.dim, device=self.device)
        wide = torch.zeros(n, device=self.device)
        used = []
        group_index = self.group_of_slot[slots]
        for index, group in enumerate(self.groups):
            mask = known & (group_index == index)
            if not mask.any():
                continue
            fids = torch.from_numpy(flat[mask]).to(self.device)
            unique, inverse, counts = torch.unique(fids, return_inverse=True, return_counts=True)
            if train:
                fid_times = torch.from_numpy(times[example_of[mask]]).to(self.device)
                unique_times = torch.zeros(len(unique), dtype=torch.int64, device=self.device).scatter_reduce_(
                    0, inverse, fid_times, reduce="amax", include_self=False)
                rows = group.table.lookup_or_insert(unique, unique_times, counts)
                weights = group.table.gather(rows).requires_grad_()  # [unique, dim + 1]; zeros if filtered
                used.append((group, rows, weights, counts))
            else:
                weights = group.table.gather(group.table.lookup(unique)).float()  # fp16 serving rows
            target = torch.from_numpy(example_of[mask] * self.num_slots + position[mask]).to(self.device)
            pooled = pooled.index_add(0, target, weights[inverse, :self.dim])
            wide = wide.index_add(0, torch.from_numpy(example_of[mask]).to(self.device), weights[inverse, self.dim])
        dense = torch.tensor(dense_values, dtype=torch.float32, device=self.device)
        logits = self.model(pooled.view(n, self.num_slots, self.dim), wide, dense)
        return logits, used

    def train_batch(self, examples: pa.Table) -> dict:
        """Score the batch (progressive metrics), then train on it; returns the batch's loss."""
        n = examples.num_rows
        logits, labels, rates, times, used = self._forward(examples, train=True)
        labels_t = torch.from_numpy(labels).to(self.device, torch.float32)
        weights = np.where(labels > 0, 1.0, 1.0 / rates)
        scores = logits.detach().cpu().numpy()
        self.metrics.update(scores, labels, weights)
        self.window_metrics.update(scores, labels, weights, times)
        offset = torch.from_numpy(np.log(rates)).to(self.device, torch.float32)
        # Summed, not averaged: each example moves its own embedding rows by a full gradient (as
        # in per-example online learning); a mean would shrink sparse updates by the batch size.
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits - offset, labels_t, reduction="sum")
        self.dense_optimizer.zero_grad()
        loss.backward()
        cow = self.spec.training.cowclip
        for group, rows, weights, counts in used:
            grad = weights.grad
            if grad is None:
                continue
            if cow.enabled:  # the deep part only: wide weights are not clipped
                grad = torch.cat([cowclip(grad[:, :self.dim], weights.detach()[:, :self.dim], counts, cow.ratio,
                                          cow.min_clip), grad[:, self.dim:]], dim=1)
            admitted = rows >= 0  # filtered fids have no row and get no update
            group.optimizer.step(group.table, rows[admitted], grad[admitted])
        warmup = self.spec.training.warmup_steps
        if self.batches < warmup:  # linear warm-up of the dense learning rate
            for group, lr in zip(self.dense_optimizer.param_groups, self.dense_lr):
                group["lr"] = lr * (self.batches + 1) / warmup
        self.dense_optimizer.step()
        self.batches += 1
        self.data_time_ms = max(self.data_time_ms, int(times.max()) if len(times) else 0)
        if self.data_time_ms - self.last_expiry_ms >= EXPIRE_EVERY_MS:
            for group in self.groups:
                group.table.expire(self.data_time_ms)
            self.last_expiry_ms = self.data_time_ms
        return {"loss": float(loss.item()) / max(n, 1), "examples": n}

    def closed_windows(self, flush: bool = False) -> list[dict]:
        """Rows of progressive metrics per event-time window that are now final (all if ``flush``)."""
        return self.window_metrics.flush() if flush else self.window_metrics.close_until(self.data_time_ms)

    def train(self, examples: pa.Table, batch_size: int | None = None) -> dict:
        """Train on ``examples`` in order, in batches; returns the progressive metrics so far."""
        batch_size = batch_size or self.spec.training.batch_size
        for start in range(0, examples.num_rows, batch_size):
            self.train_batch(examples.slice(start, batch_size))
        return self.metrics.summary()

    @torch.no_grad()
    def predict_logits(self, examples: pa.Table) -> np.ndarray:
        """Logits calibrated to unsampled traffic, without inserting or updating anything."""
        return self._forward(examples, train=False)[0].cpu().numpy()

    @torch.no_grad()
    def predict_features(self, fids: pa.ListArray, dense: pa.ListArray) -> np.ndarray:
        """Logits for extracted features (``FeatureExtractor.extract``): what serving computes."""
        fids = fids.combine_chunks() if isinstance(fids, pa.ChunkedArray) else fids
        offsets = fids.offsets.to_numpy()
        flat = fids.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        n = len(fids)
        example_of = np.repeat(np.arange(n), np.diff(offsets))
        dense = dense.combine_chunks() if isinstance(dense, pa.ChunkedArray) else dense
        dense_values = dense.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, -1)
        logits, _ = self._forward_fids(flat, example_of, n, dense_values, None, train=False)
        return logits.cpu().numpy()

    def _cached_table(self, config: TableConfig, index: int) -> EmbeddingTable:
        from trainer.redis_store import RedisStore, RedisStoreConfig

        store_config = RedisStoreConfig.from_uri(self.store_uri)
        store = RedisStore(store_config, config, name=f"{self.spec.name}:g{index}")
        return EmbeddingTable(dataclasses.replace(config, max_rows=store_config.cache_rows), store=store)

    def write_back(self) -> None:
        """Write every table's touched rows to its backing store (nothing without one)."""
        for group in self.groups:
            group.table.write_back()

    def training_state(self) -> dict:
        """Everything but the tables needed to continue training exactly (for snapshots)."""
        return {"model": self.model.state_dict(), "dense_optimizer": self.dense_optimizer.state_dict(),
                "metrics": self.metrics.__dict__.copy(), "window_metrics": self.window_metrics.__dict__.copy(),
                "batches": self.batches, "data_time_ms": self.data_time_ms, "last_expiry_ms": self.last_expiry_ms,
                "unknown_slot_fids": self.unknown_slot_fids}

    def load_training_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if not self.serving:
            self.dense_optimizer.load_state_dict(state["dense_optimizer"])
        self.metrics.__dict__.update(state["metrics"])
        self.window_metrics.__dict__.update(state["window_metrics"])
        for key in ("batches", "data_time_ms", "last_expiry_ms", "unknown_slot_fids"):
            setattr(self, key, state[key])
