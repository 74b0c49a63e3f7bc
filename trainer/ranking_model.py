"""The model a spec describes, as the trainer and serving both hold it: the tables, their slot
groups, the Example layout and the forward pass.

Slots are grouped by optimizer; each group has one collisionless table whose rows hold the deep
embedding (``dim`` floats) and the fid's wide weight (one more float), so one index lookup serves
both (the optimizers are element-wise, so the two share a row). A trainer's rows also hold the
optimizer state; serving's hold the weights only (optionally in fp16).

Forward pass: per group, the distinct fids of a batch -> their rows -> pooled embeddings per slot
(sum) ``[n, slots, dim]`` and wide sums ``[n]`` -> the dense network (``trainer.models.CTRModel``)
-> the logit for unsampled traffic. A fid without a row (unseen, filtered, expired) reads as zeros.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from schemas.fids import HASH_BITS, MAX_SLOT_ID
from schemas.spec_types import FeatureSpec, OptimizerKind, OptimizerSpec, SlotSpec
from trainer.embedding_table import EmbeddingTable
from trainer.models import CTRModel
from trainer.sparse_optimizers import SparseOptimizer
from trainer.table_config import TableConfig


@dataclass
class TableGroup:
    """The slots that share an optimizer, and their table."""

    slot_ids: list[int]
    table: EmbeddingTable  # rows: [deep embedding (dim) | wide weight (1)] (+ optimizer state)
    optimizer: SparseOptimizer  # how the rows train (it also fixes the state width)

    @property
    def uses_squares(self) -> bool:
        """Whether its optimizer takes the summed squared gradients (Adagrad's and FTRL's accumulators)."""
        return self.optimizer.spec.kind in (OptimizerKind.ADAGRAD, OptimizerKind.FTRL)

    @property
    def sequential(self) -> bool:
        """Whether its rows can take sequential in-batch updates (``trainer.in_batch``)."""
        return self.optimizer.spec.kind in (OptimizerKind.ADAGRAD, OptimizerKind.SGD)


def slot_groups(spec: FeatureSpec) -> list[tuple[OptimizerSpec, list[SlotSpec]]]:
    """The spec's slots grouped by optimizer, in order of first appearance: one table each."""
    by_optimizer: dict[OptimizerSpec, list[SlotSpec]] = {}
    for slot in spec.slots:
        by_optimizer.setdefault(slot.optimizer, []).append(slot)
    return list(by_optimizer.items())


def table_configs(spec: FeatureSpec, device: str = "cpu", seed: int = 0, optimizer_state: bool = True,
                  embedding_dtype: str = "float32") -> list[TableConfig]:
    """Each group's table config: rows of ``dim + 1`` floats (deep | wide), plus the optimizer's
    state floats where ``optimizer_state`` (a trainer's table; serving's have none). Table ``i``
    is seeded ``seed + i``."""
    configs = []
    for index, (optimizer, slots) in enumerate(slot_groups(spec)):
        width = slots[0].dim + 1
        state_width = SparseOptimizer.state_width(optimizer.kind, width) if optimizer_state else 0
        config = TableConfig.for_slots(slots, state_width=state_width, state_init=SparseOptimizer(optimizer).state_init,
                                       device=device, seed=seed + index, embedding_dtype=embedding_dtype)
        configs.append(dataclasses.replace(config, dim=width))
    return configs


@dataclass
class ResolvedWindow:
    """Rows of one table's fids for a window of coming occurrences, found in one search; valid
    until the table frees rows (expiry, eviction: ``rows_freed`` changes). Training's cache."""

    start: int  # the window: occurrences start:stop of the group
    stop: int
    fids: torch.Tensor  # [distinct] the window's distinct fids, sorted
    inverse: torch.Tensor  # [stop - start] index into fids
    rows: torch.Tensor  # [distinct] their rows; -1 while not in the table
    rows_freed: int  # the table's rows_freed when searched


@dataclass
class GroupFids:
    """The fids of one table's slots in a prepared Example table, in example order."""

    fids: torch.Tensor  # [occurrences] int64
    example: torch.Tensor  # [occurrences] the example each occurrence belongs to
    target: torch.Tensor  # [occurrences] example * slots + the slot's position: its pooled row
    times: torch.Tensor  # [occurrences] the example's impression time (ms)
    bounds: np.ndarray  # [examples + 1]: example i's occurrences are bounds[i]:bounds[i + 1]
    resolved: ResolvedWindow | None = None


@dataclass
class PreparedExamples:
    """An Example table's columns as arrays, converted once and then trained on in slices: a
    slice of examples is a slice of each group's occurrences, with no per-batch conversion."""

    n: int
    groups: list[GroupFids]
    labels: np.ndarray  # [n] float64, the target label
    times: np.ndarray  # [n] impression time (ms)
    rates: np.ndarray  # [n] the sampling rate each example was kept at
    label_tensor: torch.Tensor  # [n] float32 labels on the device
    log_rate: torch.Tensor  # [n] log(sample_rate): the logit offset of sampled training
    dense: torch.Tensor  # [n, dense features] float32
    unknown_slot_fids: int  # fids of slots the spec does not have (left out)


def target_labels(examples: pa.Table, target: str) -> np.ndarray:
    """The value of label ``target`` per Example (0 where it has none) [examples] float64."""
    labels_column = examples.column("labels").combine_chunks()
    is_target = labels_column.keys.to_numpy(zero_copy_only=False) == target
    label_rows = np.repeat(np.arange(examples.num_rows), np.diff(labels_column.offsets.to_numpy()))
    labels = np.zeros(examples.num_rows)
    labels[label_rows[is_target]] = labels_column.items.to_numpy(zero_copy_only=False)[is_target]
    return labels


#: (group index, the group's fids of a slice, occurrences lo:hi) -> (weights of the distinct
#: fids [distinct, dim + 1], index of each occurrence into them [hi - lo]).
RowReader = Callable[[int, GroupFids, int, int], tuple[torch.Tensor, torch.Tensor]]


class RankingModel:
    """Tables per slot group and the dense network of ``spec``; see the module docstring.

    ``store`` (a ``redis://`` URI): each table is a bounded cache (the store's ``cache_rows``)
    in front of rows kept there (``trainer.redis_store``)."""

    def __init__(self, spec: FeatureSpec, device: str = "cpu", seed: int = 0, optimizer_state: bool = True,
                 store: str | None = None, embedding_dtype: str = "float32"):
        self.spec, self.device = spec, torch.device(device)
        torch.manual_seed(seed)  # (the dense network's initial weights)
        self.slot_position = np.full(MAX_SLOT_ID + 1, -1, dtype=np.int64)
        for position, slot in enumerate(spec.slots):
            self.slot_position[slot.slot_id] = position
        configs = table_configs(spec, device, seed, optimizer_state, embedding_dtype)
        self.groups = []
        for index, ((optimizer, slots), config) in enumerate(zip(slot_groups(spec), configs)):
            table = EmbeddingTable(config) if store is None else _cached_table(spec, store, config, index)
            self.groups.append(TableGroup([s.slot_id for s in slots], table, SparseOptimizer(optimizer)))
        self.group_of_slot = np.full(MAX_SLOT_ID + 1, -1, dtype=np.int64)
        for index, group in enumerate(self.groups):
            self.group_of_slot[group.slot_ids] = index
        self.net = CTRModel.from_spec(spec).to(self.device)
        self.target = spec.labels.target
        self.dim = spec.slots[0].dim
        self.num_slots = len(spec.slots)

    def prepare(self, examples: pa.Table) -> PreparedExamples:
        """The columns of ``examples`` laid out for training or scoring in slices."""
        fids = examples.column("fids").combine_chunks()
        offsets = fids.offsets.to_numpy()
        flat = fids.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        example_of = np.repeat(np.arange(examples.num_rows), np.diff(offsets))
        labels = target_labels(examples, self.target)
        dense = examples.column("dense").combine_chunks()
        dense_values = dense.values.to_numpy(zero_copy_only=False).reshape(examples.num_rows, -1)
        times = examples.column("impression_time_ms").to_numpy()
        rates = examples.column("sample_rate").to_numpy()
        slots = flat >> HASH_BITS
        position = self.slot_position[slots]
        known = position >= 0
        group_index = np.where(known, self.group_of_slot[slots], -1)
        n = examples.num_rows
        groups = []
        for index in range(len(self.groups)):
            mask = group_index == index
            examples_of_group = example_of[mask]
            bounds = np.searchsorted(examples_of_group, np.arange(n + 1))  # fids of example i: [b[i], b[i+1])
            groups.append(GroupFids(
                fids=torch.from_numpy(flat[mask]).to(self.device),
                example=torch.from_numpy(examples_of_group).to(self.device),
                target=torch.from_numpy(examples_of_group * self.num_slots + position[mask]).to(self.device),
                times=torch.from_numpy(times[examples_of_group]).to(self.device),
                bounds=bounds))
        device = self.device
        return PreparedExamples(
            n=n, groups=groups, labels=labels, times=times, rates=rates,
            label_tensor=torch.from_numpy(labels).to(device, torch.float32),
            log_rate=torch.from_numpy(np.log(rates)).to(device, torch.float32),
            dense=torch.from_numpy(np.array(dense_values, dtype=np.float32)).to(device),
            unknown_slot_fids=int((~known).sum()))

    def pool(self, prepared: PreparedExamples, start: int, stop: int,
             read_rows: RowReader | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embeddings [n * slots, dim] and wide sums [n] of examples ``start:stop``.
        ``read_rows`` gives each group's weights (training inserts and counts there); by default
        they are only read (``lookup``: absent fids read as zeros). A group without a fid in the
        examples is skipped."""
        n, dim = stop - start, self.dim
        pooled = torch.zeros(n * self.num_slots, dim, device=self.device)
        wide = torch.zeros(n, device=self.device)
        for index, fids_of in enumerate(prepared.groups):
            lo, hi = int(fids_of.bounds[start]), int(fids_of.bounds[stop])
            if lo == hi:
                continue
            weights, inverse = (read_rows or self._read_only)(index, fids_of, lo, hi)
            occurrences = weights.index_select(0, inverse)
            pooled.index_add_(0, fids_of.target[lo:hi] - start * self.num_slots, occurrences[:, :dim])
            wide.index_add_(0, fids_of.example[lo:hi] - start, occurrences[:, dim])
        return pooled, wide

    def _read_only(self, index: int, fids_of: GroupFids, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.groups[index].table
        unique, inverse = torch.unique(fids_of.fids[lo:hi], return_inverse=True)
        return table.gather(table.lookup(unique)).float(), inverse  # (fp16 serving rows)

    def forward(self, pooled: torch.Tensor, wide: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Logits [n] for unsampled traffic."""
        return self.net(pooled.view(len(wide), self.num_slots, self.dim), wide, dense)

    @torch.no_grad()
    def predict_prepared(self, prepared: PreparedExamples) -> np.ndarray:
        pooled, wide = self.pool(prepared, 0, prepared.n)
        return self.forward(pooled, wide, prepared.dense).cpu().numpy()

    def predict_logits(self, examples: pa.Table) -> np.ndarray:
        """Logits calibrated to unsampled traffic, without inserting or updating anything."""
        return self.predict_prepared(self.prepare(examples))

    def predict_features(self, fids: pa.ListArray, dense: pa.ListArray) -> np.ndarray:
        """Logits for extracted features (``FeatureExtractor.extract``): what serving computes."""
        fids = fids.combine_chunks() if isinstance(fids, pa.ChunkedArray) else fids
        dense = dense.combine_chunks() if isinstance(dense, pa.ChunkedArray) else dense
        n = len(fids)
        no_labels = pa.MapArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.string()),
                                            pa.array([], pa.float64()))
        examples = pa.table({
            "fids": fids, "dense": dense, "labels": no_labels,
            "impression_time_ms": pa.array(np.zeros(n, dtype=np.int64)),
            "sample_rate": pa.array(np.ones(n))})
        return self.predict_logits(examples)


def _cached_table(spec: FeatureSpec, uri: str, config: TableConfig, index: int) -> EmbeddingTable:
    from trainer.redis_config import RedisStoreConfig
    from trainer.redis_store import RedisStore

    store_config = RedisStoreConfig.from_uri(uri)
    store = RedisStore(store_config, config, name=f"{spec.name}:g{index}")
    return EmbeddingTable(dataclasses.replace(config, max_rows=store_config.cache_rows), store=store)
