"""Rows in transit (``RowBatch``), the backing-store protocol (``RowStore``) and a table's ``Delta``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch


def max_per_group(values: torch.Tensor, inverse: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups] int64: the largest of ``values`` per group (``inverse[i]``: the group of value i),
    e.g. each distinct fid's newest event time among its occurrences."""
    return torch.zeros(groups, dtype=torch.int64, device=values.device).scatter_reduce_(
        0, inverse, values, reduce="amax", include_self=False)


@dataclass
class RowBatch:
    """Rows in transit between a table and a store (or a snapshot)."""

    fids: torch.Tensor  # int64 [n]
    embeddings: torch.Tensor  # float32 [n, dim]
    state: torch.Tensor  # float32 [n, state_width]
    last_seen_ms: torch.Tensor  # int64 [n]
    counts: torch.Tensor  # int32 [n]

    def __len__(self) -> int:
        return len(self.fids)

    def select(self, mask: torch.Tensor) -> "RowBatch":
        return RowBatch(*(getattr(self, f.name)[mask] for f in dataclasses.fields(self)))

    def to(self, device) -> "RowBatch":
        return RowBatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def without_state(self) -> "RowBatch":
        """The same rows with no optimizer state (for a table that holds weights only)."""
        return dataclasses.replace(self, state=self.state[:, :0])

    @staticmethod
    def concat(batches: list["RowBatch"]) -> "RowBatch":
        return RowBatch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(RowBatch)))


class RowStore(Protocol):
    """A backing store of rows by fid (host memory, Redis, ...)."""

    #: Whether the store outlives the trainer's process (Redis): then it has identity ``tokens``,
    #: ``check_identity``, the trainer's position (``trained_mark``; ``trainer.redis_store``) and
    #: ``share`` (the workers of a sharded trainer keep their rows in it together).
    persistent: bool

    def get_rows(self, fids: torch.Tensor) -> tuple[torch.Tensor, RowBatch]:
        """(found mask over ``fids``, the found rows in the order of ``fids[found]``)."""

    def put_rows(self, rows: RowBatch) -> None:
        """Insert or overwrite rows."""

    def delete(self, fids: torch.Tensor) -> None:
        """Remove rows; unknown fids are ignored."""

    def expire_fids(self, data_time_ms: int) -> torch.Tensor:
        """Remove the rows expired at ``data_time_ms`` (each slot's ``expire_after``); their fids."""

    def flush(self) -> None:
        """Return once every write so far is stored (a write-behind store acknowledges later)."""


@dataclass
class Delta:
    """Changes since the previous ``take_delta``: apply ``removed`` first, then upsert ``updated``."""

    updated: RowBatch
    removed: torch.Tensor  # int64 fids

    @property
    def fids(self) -> torch.Tensor:
        return self.updated.fids
