"""What a collisionless table is configured with: per-slot policies and the table's sizes.

Per-slot policies (``slot = fid >> 48``): ``expire_after_ms`` is judged on *data time*, the
newest event time the table has seen, never the wall clock; ``min_count`` admits a fid only after
that many occurrences; the initializer fills new rows (``init_scale`` x N(0, 1), U(-1, 1), ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from schemas.fids import MAX_SLOT_ID
from schemas.spec_types import InitializerKind, SlotSpec

NEVER = -1  # expire_after_ms for "never expires", in the per-slot lookup tensors


@dataclass(frozen=True)
class SlotPolicy:
    """What the table does with one slot's fids."""

    expire_after_ms: int | None = None  # None: never expires
    min_count: int = 1
    initializer: InitializerKind = InitializerKind.NORMAL
    init_scale: float = 0.01

    def __post_init__(self):
        if self.expire_after_ms is not None and self.expire_after_ms <= 0:
            raise ValueError(f"expire_after_ms must be > 0 or None, got {self.expire_after_ms}")
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")

    @classmethod
    def from_slot(cls, slot: SlotSpec) -> "SlotPolicy":
        return cls(slot.expire_after_ms, slot.min_count, slot.initializer.kind, slot.initializer.scale)


@dataclass(frozen=True)
class TableConfig:
    dim: int
    state_width: int = 0  # optimiser state floats per row
    state_init: float = 0.0  # initial value of the optimiser state (e.g. Adagrad's accumulator)
    slots: dict[int, SlotPolicy] = field(default_factory=dict)  # slot id -> policy; others: default
    default_policy: SlotPolicy = SlotPolicy()
    initial_buckets: int = 1024
    initial_rows: int = 4096
    max_load: float = 0.92  # grow the index past this share of occupied slots
    growth: float = 2.0  # index growth factor (bucket counts need not be powers of two); the index is
    # 12 bytes a slot, so doubling costs little and keeps rebuilds (a stall of the table) rare
    row_growth: float = 1.125  # row-pool growth factor: small, as rows dominate the memory
    max_kick_rounds: int = 64
    stash_after_rounds: int = 10  # displacement rounds before the rest goes to the stash
    max_rows: int | None = None  # bound the table (a cache in front of a RowStore)
    evict_fraction: float = 0.05  # evict this share of max_rows beyond what is needed
    filter_width: int = 1 << 20
    filter_depth: int = 4
    seed: int = 0
    device: str = "cpu"
    embedding_dtype: str = "float32"  # or "float16" (serving tables: half the memory)

    def __post_init__(self):
        if self.dim <= 0:
            raise ValueError(f"dim must be > 0, got {self.dim}")
        if self.state_width < 0:
            raise ValueError(f"state_width must be >= 0, got {self.state_width}")
        if not 0.1 <= self.max_load <= 0.98:
            raise ValueError(f"max_load must be in [0.1, 0.98], got {self.max_load}")
        if self.growth <= 1.0 or self.row_growth <= 1.0:
            raise ValueError(f"growth and row_growth must be > 1, got {self.growth}, {self.row_growth}")
        if self.max_rows is not None and self.max_rows <= 0:
            raise ValueError(f"max_rows must be > 0, got {self.max_rows}")
        if self.embedding_dtype not in ("float32", "float16"):
            raise ValueError(f"embedding_dtype must be float32 or float16, got {self.embedding_dtype!r}")
        for slot in self.slots:
            if not 0 <= slot <= MAX_SLOT_ID:
                raise ValueError(f"slot id {slot} outside [0, {MAX_SLOT_ID}]")

    @classmethod
    def for_slots(cls, slots: Iterable[SlotSpec], **overrides) -> "TableConfig":
        """One table for slots that share a dim and an optimiser (as the trainer groups them)."""
        slots = list(slots)
        dims = {s.dim for s in slots}
        if len(dims) != 1:
            raise ValueError(f"one table needs one dim, got {sorted(dims)} for slots {[s.name for s in slots]}")
        policies = {s.slot_id: SlotPolicy.from_slot(s) for s in slots}
        return cls(dim=dims.pop(), slots=policies, **overrides)
