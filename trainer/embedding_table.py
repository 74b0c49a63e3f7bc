"""The collisionless embedding table (Monolith): an exact-key cuckoo hash table from fid to row.

Index: bucketized cuckoo hashing, ``num_buckets`` buckets x 4 slots of (fid, row). A fid may
live in two buckets: ``b1 = fastrange(lo32(h), B)`` and ``b2 = (f - b1) mod B`` with
``f = fastrange(hi32(h), B)``, ``h = mix64(fid)``. ``b -> f - b`` is an involution, so a fid's
other bucket follows from the bucket it sits in and its hash alone (the partial-key trick).
Inserts are placed in batches: each pending fid takes a free slot of its bucket (ranked within
the batch so no two take the same slot), then of its other bucket; the rest displace an occupant,
which moves on to *its* other bucket, for up to ``stash_after_rounds`` rounds. The few fids
still pending then go to a small *stash* (``STASH_BUCKETS`` x 4 slots after the last bucket,
probed by full comparison when a fid is in neither of its buckets), which cuts the long tail of
displacement rounds - each a few dozen small kernels, costly on a GPU. While more are pending
than the stash has room for, displacement goes on if the stash is at least half free; otherwise,
or after ``max_kick_rounds``, the index grows (rehash into ``growth`` x buckets, which empties the stash).
The index also grows when its load passes ``max_load``. All of it is vectorised torch, so it runs on CPU and CUDA alike.

Rows: a pool of embedding rows (``dim`` floats), optimiser state (``state_width`` floats),
last-seen event time (int64 ms), occurrence count (int32) and a touched flag, reused through a
free list. Two distinct fids never share a row.

Per-slot policies (``slot = fid >> 48``): ``expire_after_ms`` is judged on *data time*, the
newest event time the table has seen, never the wall clock; ``min_count`` admits a fid only after
that many occurrences (a count-min sketch counts the not-yet-admitted; it is not reset when a row
expires or is removed, so a returning fid that had passed the threshold is admitted at once); the
initializer fills new rows. Optionally the table is bounded (``max_rows``) and sits in front of a backing ``RowStore``:
misses are fetched from it and the least-recently-seen rows are written back and evicted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch

from schemas.fids import HASH_BITS, MAX_SLOT_ID
from schemas.spec import InitializerKind, SlotSpec
from trainer.frequency_filter import CountMinSketch
from trainer.hashing import fast_range, mix64

EMPTY = -1
SLOTS_PER_BUCKET = 4
STASH_BUCKETS = 128  # stash buckets (x 4 slots) after the hashed buckets
NEVER = -1  # expire_after_ms for "never expires"


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
    growth: float = 1.3  # index growth factor (bucket counts need not be powers of two)
    row_growth: float = 1.125  # row-pool growth factor: small, as rows dominate the memory
    max_kick_rounds: int = 64
    stash_after_rounds: int = 10  # displacement rounds before the rest goes to the stash
    max_rows: int | None = None  # bound the table (a cache in front of a RowStore)
    evict_fraction: float = 0.05  # evict this share of max_rows beyond what is needed
    filter_width: int = 1 << 20
    filter_depth: int = 4
    seed: int = 0
    device: str = "cpu"

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

    @staticmethod
    def concat(batches: list["RowBatch"]) -> "RowBatch":
        return RowBatch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(RowBatch)))


class RowStore(Protocol):
    """A backing store of rows by fid (host memory, Redis, ...)."""

    #: Whether the store outlives the trainer's process (Redis): then it has identity ``tokens``,
    #: ``check_identity`` and the trainer's position (``trained_mark``; ``trainer.redis_store``).
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


class EmbeddingTable:
    """Collisionless fid -> row table; see the module docstring for the design."""

    def __init__(self, config: TableConfig, store: RowStore | None = None):
        if config.max_rows is not None and store is None:
            raise ValueError("a bounded table (max_rows) needs a backing store to evict to")
        self.config = config
        self.store = store
        self.device = torch.device(config.device)
        self.dim, self.state_width = config.dim, config.state_width
        self.num_buckets = max(2, config.initial_buckets)
        self._new_index(self.num_buckets)
        rows = max(1, config.initial_rows if config.max_rows is None else min(config.initial_rows, config.max_rows))
        self.embeddings = torch.zeros(rows, self.dim, device=self.device)
        self.state = torch.zeros(rows, self.state_width, device=self.device)
        self.last_seen_ms = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.counts = torch.zeros(rows, dtype=torch.int32, device=self.device)
        self.touched = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self.next_row = 0  # rows below this were handed out at least once
        self.free_rows = torch.empty(0, dtype=torch.int64, device=self.device)
        self.size = 0
        self.rows_freed = 0  # counts frees: a fid -> row mapping read before a change is stale after it
        self.data_time_ms = 0
        self.removed_fids: list[torch.Tensor] = []
        self.evicted_touched: list[RowBatch] = []
        # Two random streams: new rows' initial values, and the cuckoo's displacement choices. Kept
        # apart, a fid's initial value depends only on the inserts before it, not on how the index
        # was laid out (a bounded cache that evicts and fetches initialises exactly as a big table).
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.placement_generator = torch.Generator(device=self.device)
        self.placement_generator.manual_seed(config.seed ^ 0x5EED)
        self._policy_tables()
        self.sketch = (CountMinSketch(config.filter_width, config.filter_depth, config.seed, self.device)
                       if self._uses_filter else None)
        self.stats = {"inserts": 0, "filtered": 0, "expired": 0, "evicted": 0, "fetched": 0, "grows": 0,
                      "stashed": 0, "lookups": 0, "hits": 0}

    # ---------------------------------------------------------------------------------------
    # policies per slot, as lookup tensors indexed by slot id

    def _policy_tables(self) -> None:
        n = MAX_SLOT_ID + 1
        default = self.config.default_policy
        expire = torch.full((n,), NEVER if default.expire_after_ms is None else default.expire_after_ms,
                            dtype=torch.int64)
        min_count = torch.full((n,), default.min_count, dtype=torch.int64)
        for slot, policy in self.config.slots.items():
            expire[slot] = NEVER if policy.expire_after_ms is None else policy.expire_after_ms
            min_count[slot] = policy.min_count
        self.expire_by_slot = expire.to(self.device)
        self.min_count_by_slot = min_count.to(self.device)
        self._uses_filter = bool((min_count > 1).any())
        self._uses_expiry = bool((expire != NEVER).any())

    def policy(self, slot: int) -> SlotPolicy:
        return self.config.slots.get(slot, self.config.default_policy)

    # ---------------------------------------------------------------------------------------
    # index

    def _new_index(self, num_buckets: int) -> None:
        """Keys [B + stash, 4] int64 (EMPTY = -1) and rows [B + stash, 4] int32: 12 bytes per slot."""
        self.num_buckets = num_buckets
        total = num_buckets + STASH_BUCKETS
        self.index_keys = torch.full((total, SLOTS_PER_BUCKET), EMPTY, dtype=torch.int64, device=self.device)
        self.index_rows = torch.zeros((total, SLOTS_PER_BUCKET), dtype=torch.int32, device=self.device)
        self.stash_used = False  # set when a key goes to the stash; the stash is probed only then

    def _hash(self, fids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b1, f): the first bucket and the involution constant; the other bucket is (f - b) mod B."""
        h = mix64(fids, self.config.seed)
        b1 = fast_range(h & 0xFFFFFFFF, self.num_buckets)
        f = fast_range((h >> 32) & 0xFFFFFFFF, self.num_buckets)
        return b1, f

    def _set(self, buckets: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor) -> None:
        self.index_keys[buckets, slots] = keys
        self.index_rows[buckets, slots] = rows.to(torch.int32)

    def _other_bucket(self, f: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
        """(f - bucket) mod B, for f, bucket in [0, B) (cheaper than torch.remainder)."""
        other = f - bucket
        return other + (other < 0) * self.num_buckets

    def _probe(self, fids: torch.Tensor, buckets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(found, slot) of each fid in one bucket each.

        The bucket's 4 keys are read with ``index_select`` and compared at once. Keys are
        unique, so at most one comparison hits: the 4 bool bytes read as one int32 are
        ``1 << 8s`` for a hit in slot ``s``, and ``s = (float exponent - 1) / 8`` - no argmax.
        """
        hit = self.index_keys.index_select(0, buckets) == fids.unsqueeze(1)
        pattern = hit.view(torch.uint8).view(torch.int32).squeeze(1)
        slot = torch.div(torch.frexp(pattern.to(torch.float32)).exponent - 1, 8, rounding_mode="floor")
        return pattern != 0, slot

    def _find(self, fids: torch.Tensor, want_positions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows, index positions if asked) of ``fids``; -1 where absent.

        The first bucket is probed for all fids, the second only for those not found there.
        """
        b1, f = self._hash(fids)
        found, slot = self._probe(fids, b1)
        positions = b1 * SLOTS_PER_BUCKET + slot
        if not bool(found.all()):
            rest = torch.nonzero(~found).squeeze(1)
            b2 = self._other_bucket(f.index_select(0, rest), b1.index_select(0, rest))
            found2, slot2 = self._probe(fids.index_select(0, rest), b2)
            found[rest] = found2
            positions[rest] = b2 * SLOTS_PER_BUCKET + slot2
            if self.stash_used and not bool(found2.all()):  # in neither bucket: compare with the stash
                missing = rest.index_select(0, torch.nonzero(~found2).squeeze(1))
                stash = self.index_keys[self.num_buckets:].reshape(-1)
                hit = fids.index_select(0, missing).unsqueeze(1) == stash.unsqueeze(0)  # [missing, stash slots]
                found[missing] = hit.any(dim=1)
                positions[missing] = self.num_buckets * SLOTS_PER_BUCKET + hit.to(torch.uint8).argmax(dim=1)
        positions = torch.where(found, positions, torch.full_like(positions, -1))
        rows = self.index_rows.view(-1).index_select(0, positions.clamp(min=0)).long()
        rows = torch.where(found, rows, torch.full_like(rows, -1))
        return rows, (positions if want_positions else None)

    @staticmethod
    def _rank_within_groups(sorted_groups: torch.Tensor) -> torch.Tensor:
        """0, 1, 2, ... within each run of equal values of a sorted tensor."""
        n = len(sorted_groups)
        idx = torch.arange(n, device=sorted_groups.device)
        starts = torch.ones(n, dtype=torch.bool, device=sorted_groups.device)
        starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
        start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
        return idx - start_idx

    def _fill_free(self, keys: torch.Tensor, rows: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        """Put as many (key, row) as fit into free slots of their bucket; returns the placed mask."""
        order = torch.argsort(buckets, stable=True)
        sorted_buckets = buckets[order]
        rank = self._rank_within_groups(sorted_buckets)
        free = self.index_keys.index_select(0, sorted_buckets) == EMPTY
        free_rank = free.cumsum(dim=1) - 1
        ok = rank < free_rank[:, -1] + 1
        slot = (free & (free_rank == rank.unsqueeze(1))).to(torch.uint8).argmax(dim=1)
        chosen = order[ok]
        self._set(sorted_buckets[ok], slot[ok], keys[chosen], rows[chosen])
        placed = torch.zeros(len(keys), dtype=torch.bool, device=self.device)
        placed[chosen] = True
        return placed

    def _place(self, keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Insert absent, unique keys; returns the (keys, rows) that found no place (to grow for)."""
        b1, f = self._hash(keys)
        target = b1
        for round_ in range(self.config.max_kick_rounds):
            if round_ >= self.config.stash_after_rounds and len(keys):
                keys, rows, stash_free = self._to_stash(keys, rows)  # all or nothing
                if len(keys) and stash_free < STASH_BUCKETS * SLOTS_PER_BUCKET // 2:
                    return keys, rows  # the stash is filling up: grow (which empties it)
            if len(keys) == 0:
                break
            placed = self._fill_free(keys, rows, target)
            keys, rows, target, f = keys[~placed], rows[~placed], target[~placed], f[~placed]
            if len(keys) == 0:
                break
            other = self._other_bucket(f, target)
            placed = self._fill_free(keys, rows, other)
            keys, rows, target, f = keys[~placed], rows[~placed], target[~placed], f[~placed]
            if len(keys) == 0:
                break
            # Both buckets full: displace one occupant of the target bucket per pending key.
            order = torch.argsort(target, stable=True)
            keys, rows, target, f = keys[order], rows[order], target[order], f[order]
            rank = self._rank_within_groups(target)
            kick = rank < SLOTS_PER_BUCKET
            kick_buckets = target[kick]
            # One random offset per bucket, plus the rank: a bucket's kickers take distinct slots,
            # and the displacement is a random walk (a fixed choice can cycle).
            offset = torch.randint(0, SLOTS_PER_BUCKET, (len(keys),), generator=self.placement_generator,
                                   device=self.device)
            group_offset = offset[torch.arange(len(keys), device=self.device) - rank]
            kick_slots = (rank[kick] + group_offset[kick]) % SLOTS_PER_BUCKET
            victim_keys = self.index_keys[kick_buckets, kick_slots]
            victim_rows = self.index_rows[kick_buckets, kick_slots].long()
            self._set(kick_buckets, kick_slots, keys[kick], rows[kick])
            victim_buckets = target[kick]
            occupied = victim_keys != EMPTY
            victim_keys, victim_rows, victim_buckets = (victim_keys[occupied], victim_rows[occupied],
                                                       victim_buckets[occupied])
            _, victim_f = self._hash(victim_keys)
            waiting = ~kick  # a bucket's fifth and later contenders try their other bucket next round
            keys = torch.cat([victim_keys, keys[waiting]])
            rows = torch.cat([victim_rows, rows[waiting]])
            f = torch.cat([victim_f, f[waiting]])
            target = torch.cat([self._other_bucket(victim_f, victim_buckets),
                                self._other_bucket(f[len(victim_keys):], target[waiting])])
        return keys, rows

    def _to_stash(self, keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Put pending keys into free stash slots if they all fit; returns what is left and the
        free stash slots before."""
        stash = self.index_keys[self.num_buckets:].reshape(-1)
        free = torch.nonzero(stash == EMPTY).squeeze(1)
        if len(free) < len(keys):
            return keys, rows, len(free)
        position = self.num_buckets * SLOTS_PER_BUCKET + free[:len(keys)]
        self._set(position // SLOTS_PER_BUCKET, position % SLOTS_PER_BUCKET, keys, rows)
        self.stash_used = True
        self.stats["stashed"] += len(keys)
        return keys[:0], rows[:0], len(free)

    def _live(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, keys, rows) of every occupied index slot."""
        occupied = torch.nonzero(self.index_keys != EMPTY)
        buckets, slots = occupied[:, 0], occupied[:, 1]
        positions = buckets * SLOTS_PER_BUCKET + slots
        return positions, self.index_keys[buckets, slots], self.index_rows[buckets, slots].long()

    def _rebuild(self, num_buckets: int, extra_keys: torch.Tensor, extra_rows: torch.Tensor) -> None:
        _, keys, rows = self._live()
        keys, rows = torch.cat([keys, extra_keys]), torch.cat([rows, extra_rows])
        while True:
            self.num_buckets = num_buckets
            self._new_index(num_buckets)
            left, _ = self._place(keys, rows)
            self.stats["grows"] += 1
            if len(left) == 0:
                return
            num_buckets = int(num_buckets * self.config.growth)

    def _insert_index(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        needed = self.size + len(keys)
        if needed > self.config.max_load * self.num_buckets * SLOTS_PER_BUCKET:
            # Grow to a load of max_load / growth: room for the next inserts, few kicks.
            target_load = self.config.max_load / self.config.growth
            buckets = max(int(self.num_buckets * self.config.growth) + 1,
                          int(needed / (target_load * SLOTS_PER_BUCKET)) + 1)
            self._rebuild(buckets, keys, rows)
        else:
            left_keys, left_rows = self._place(keys, rows)
            if len(left_keys):
                self._rebuild(int(self.num_buckets * self.config.growth) + 1, left_keys, left_rows)
        self.size += len(keys)

    # ---------------------------------------------------------------------------------------
    # row pool

    def _grow_pool(self, rows_needed: int) -> None:
        capacity = len(self.embeddings)
        if rows_needed <= capacity:
            return
        new_capacity = max(rows_needed, int(capacity * self.config.row_growth))
        if self.config.max_rows is not None:
            new_capacity = min(new_capacity, self.config.max_rows)

        def grown(tensor: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((new_capacity, *tensor.shape[1:]), dtype=tensor.dtype, device=self.device)
            out[:capacity] = tensor
            return out

        self.embeddings, self.state = grown(self.embeddings), grown(self.state)
        self.last_seen_ms, self.counts, self.touched = grown(self.last_seen_ms), grown(self.counts), grown(self.touched)

    def _allocate_rows(self, n: int) -> torch.Tensor:
        reused = self.free_rows[:n]
        self.free_rows = self.free_rows[n:]
        fresh = n - len(reused)
        self._grow_pool(self.next_row + fresh)
        new = torch.arange(self.next_row, self.next_row + fresh, device=self.device)
        self.next_row += fresh
        return torch.cat([reused, new])

    def _initial_embeddings(self, fids: torch.Tensor) -> torch.Tensor:
        values = torch.zeros(len(fids), self.dim, device=self.device)
        slots = fids >> HASH_BITS
        for slot in torch.unique(slots).tolist():
            mask = slots == slot
            policy = self.policy(slot)
            n = int(mask.sum())
            if policy.initializer is InitializerKind.ZEROS:
                continue
            if policy.initializer is InitializerKind.UNIFORM:
                v = torch.rand(n, self.dim, generator=self.generator, device=self.device) * 2 - 1
            else:
                v = torch.randn(n, self.dim, generator=self.generator, device=self.device)
                if policy.initializer is InitializerKind.TRUNCATED_NORMAL:
                    v = v.clamp_(-2.0, 2.0)
            values[mask] = v * policy.init_scale
        return values

    def _write_rows(self, rows: torch.Tensor, batch: RowBatch) -> None:
        self.embeddings[rows] = batch.embeddings.to(self.embeddings.dtype)  # fp16 serving tables
        self.state[rows] = batch.state
        self.last_seen_ms[rows] = batch.last_seen_ms
        self.counts[rows] = batch.counts

    def _read_rows(self, rows: torch.Tensor, fids: torch.Tensor) -> RowBatch:
        return RowBatch(fids, self.embeddings[rows], self.state[rows], self.last_seen_ms[rows], self.counts[rows])

    def _free(self, positions: torch.Tensor, rows: torch.Tensor) -> None:
        if len(rows) == 0:
            return
        self.rows_freed += 1
        self.index_keys[positions // SLOTS_PER_BUCKET, positions % SLOTS_PER_BUCKET] = EMPTY
        self.touched[rows] = False
        self.free_rows = torch.cat([self.free_rows, rows])
        self.size -= len(rows)

    # ---------------------------------------------------------------------------------------
    # public API

    def __len__(self) -> int:
        return self.size

    @property
    def load_factor(self) -> float:
        return self.size / (self.num_buckets * SLOTS_PER_BUCKET)

    def lookup(self, fids: torch.Tensor) -> torch.Tensor:
        """Rows of ``fids`` (-1 where absent). Read-only: no insert, no time or count update."""
        rows, _ = self._find(fids.to(self.device))
        return rows

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``rows``; a row of -1 (absent or filtered fid) reads as zeros."""
        absent = rows < 0
        out = self.embeddings.index_select(0, rows.clamp(min=0))
        if bool(absent.any()):
            out[absent] = 0.0
        return out

    def lookup_or_insert(self, fids: torch.Tensor, event_time_ms: int | torch.Tensor,
                         counts: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of ``fids``, inserting the new ones that pass their slot's frequency filter.

        ``fids`` are unique unless ``counts`` is None (then duplicates are counted here).
        ``event_time_ms`` (a scalar or one per fid) updates each row's last-seen time and the
        table's data time. Returns -1 for fids held back by the filter (they get no row).
        ``rows``: their rows if already looked up (-1 where absent), valid while ``rows_freed``
        has not changed since; the index is then not searched again.
        """
        fids = fids.to(self.device)
        inverse = None
        if counts is None:
            fids, inverse, counts = torch.unique(fids, return_inverse=True, return_counts=True)
        counts = counts.to(self.device)
        times = torch.as_tensor(event_time_ms, dtype=torch.int64, device=self.device)
        if inverse is not None and times.dim() == 1:
            times = torch.zeros(len(fids), dtype=torch.int64, device=self.device).scatter_reduce_(
                0, inverse, times, reduce="amax", include_self=False)
        times = times.expand(len(fids)) if times.dim() == 0 else times
        rows = self._find(fids)[0] if rows is None or inverse is not None else rows.clone()
        missing = rows < 0
        if bool(missing.any()):
            self.stats["lookups"] += len(fids)
            self.stats["hits"] += len(fids) - int(missing.sum())
            self.data_time_ms = max(self.data_time_ms, int(times.max()))
            rows[missing] = self._insert_missing(fids[missing], times[missing], counts[missing], protect=rows[~missing])
            present = rows >= 0
            self._touch(rows[present], times[present], counts[present])
        else:
            self.record_hits(rows, times, counts)
        return rows if inverse is None else rows[inverse]

    def record_hits(self, rows: torch.Tensor, times: torch.Tensor, counts: torch.Tensor) -> None:
        """What ``lookup_or_insert`` records for fids it finds: ``rows`` (unique, all present)
        were read at event ``times`` (ms, one per row), ``counts`` times each."""
        self.stats["lookups"] += len(rows)
        self.stats["hits"] += len(rows)
        if len(rows):
            self.data_time_ms = max(self.data_time_ms, int(times.max()))
        self._touch(rows, times, counts)

    def _touch(self, rows: torch.Tensor, times: torch.Tensor, counts: torch.Tensor) -> None:
        self.last_seen_ms[rows] = torch.maximum(self.last_seen_ms[rows], times)
        self.counts[rows] += counts.to(torch.int32)

    def _insert_missing(self, fids: torch.Tensor, times: torch.Tensor, counts: torch.Tensor,
                        protect: torch.Tensor) -> torch.Tensor:
        """Rows for fids absent from the index: fetched from the store, or new if admitted."""
        rows = torch.full((len(fids),), -1, dtype=torch.int64, device=self.device)
        fetched_mask = torch.zeros(len(fids), dtype=torch.bool, device=self.device)
        fetched = None
        if self.store is not None:
            fetched_mask, fetched = self.store.get_rows(fids)
            fetched_mask = fetched_mask.to(self.device)
            fetched = fetched.to(self.device)
        new_mask = ~fetched_mask
        if self.sketch is not None and bool(new_mask.any()):
            candidates = torch.nonzero(new_mask).squeeze(1)
            thresholds = self.min_count_by_slot[fids[candidates] >> HASH_BITS]
            filtered = thresholds > 1
            if bool(filtered.any()):
                estimate = self.sketch.add(fids[candidates[filtered]], counts[candidates[filtered]])
                held = candidates[filtered][estimate < thresholds[filtered]]
                new_mask[held] = False
                self.stats["filtered"] += len(held)
        n_fetched, n_new = int(fetched_mask.sum()), int(new_mask.sum())
        if n_fetched + n_new == 0:
            return rows
        self._make_room(n_fetched + n_new, protect)
        if n_fetched:
            fetched_rows = self._allocate_rows(n_fetched)
            self._write_rows(fetched_rows, fetched)
            self.touched[fetched_rows] = False
            self._insert_index(fids[fetched_mask], fetched_rows)
            rows[fetched_mask] = fetched_rows
            self.stats["fetched"] += n_fetched
        if n_new:
            new_fids = fids[new_mask]
            new_rows = self._allocate_rows(n_new)
            self.embeddings[new_rows] = self._initial_embeddings(new_fids)
            self.state[new_rows] = self.config.state_init
            self.last_seen_ms[new_rows] = times[new_mask]
            self.counts[new_rows] = 0
            self.touched[new_rows] = True
            self._insert_index(new_fids, new_rows)
            rows[new_mask] = new_rows
            self.stats["inserts"] += n_new
        return rows

    def _make_room(self, needed: int, protect: torch.Tensor) -> None:
        """Evict least-recently-seen rows to the store until ``needed`` more rows fit under max_rows."""
        max_rows = self.config.max_rows
        if max_rows is None or self.size + needed <= max_rows:
            return
        if needed > max_rows:
            raise ValueError(f"a batch needs {needed} new rows but the table holds at most max_rows={max_rows}")
        excess = self.size + needed - max_rows + int(self.config.evict_fraction * max_rows)
        positions, keys, rows = self._live()
        age = self.last_seen_ms[rows].clone()
        protected = torch.zeros(len(self.embeddings), dtype=torch.bool, device=self.device)
        protected[protect] = True
        age[protected[rows]] = torch.iinfo(torch.int64).max
        evictable = int((~protected[rows]).sum())
        if self.size - evictable + needed > max_rows:
            raise ValueError(f"a batch uses {self.size - evictable} cached rows and needs {needed} more, "
                             f"over max_rows={max_rows}: raise max_rows or lower the batch size")
        excess = min(excess, evictable)
        victims = torch.topk(age, excess, largest=False).indices
        batch = self._read_rows(rows[victims], keys[victims])
        self.store.put_rows(batch)
        was_touched = self.touched[rows[victims]]
        if bool(was_touched.any()):
            self.evicted_touched.append(batch.select(was_touched))
        self._free(positions[victims], rows[victims])
        self.stats["evicted"] += excess

    def _record_removed(self, fids: torch.Tensor) -> None:
        """Remember removed fids for the next delta; drop stale evicted copies of them."""
        if len(fids) == 0:
            return
        self.removed_fids.append(fids)
        self.evicted_touched = [b.select(~torch.isin(b.fids, fids)) for b in self.evicted_touched]

    def mark_touched(self, rows: torch.Tensor) -> None:
        """Flag rows changed by an optimiser step, for the next delta."""
        self.touched[rows[rows >= 0]] = True

    def remove(self, fids: torch.Tensor) -> int:
        """Remove fids (here and in the store); returns how many were present here."""
        fids = torch.unique(fids.to(self.device))
        present = self.delete(fids)
        self._record_removed(fids)
        if self.store is not None:
            self.store.delete(fids)
        return present

    def expire(self, data_time_ms: int | None = None) -> int:
        """Free rows unseen for longer than their slot's ``expire_after_ms`` of data time.

        ``data_time_ms`` defaults to the newest event time this table has seen. Rows in the
        backing store expire on the same clock. Returns how many rows expired here and there;
        their fids go into the next delta's ``removed``.
        """
        now = self.data_time_ms if data_time_ms is None else data_time_ms
        expired = self.expire_fids(now)
        if self.store is not None:
            # a written-back row expires in both tiers: count it once
            expired = torch.unique(torch.cat([expired, self.store.expire_fids(now).to(self.device)]))
        self._record_removed(expired)
        self.stats["expired"] += len(expired)
        return len(expired)

    def expire_fids(self, data_time_ms: int) -> torch.Tensor:
        """Free this table's expired rows (no delta bookkeeping); returns their fids."""
        if not self._uses_expiry:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        positions, keys, rows = self._live()
        limit = self.expire_by_slot[keys >> HASH_BITS]
        expired = (limit != NEVER) & (data_time_ms - self.last_seen_ms[rows] > limit)
        self._free(positions[expired], rows[expired])
        return keys[expired]

    def take_delta(self) -> Delta:
        """Rows touched (inserted or updated) since the last call, and fids removed; resets both.

        Exact: nothing is dropped however many rows were touched; rows evicted to the store after
        being touched are included with the values they were evicted with.
        """
        positions, keys, rows = self._live()
        touched = self.touched[rows]
        current = self._read_rows(rows[touched], keys[touched])
        if self.store is not None:  # write back: the store holds every row as of this delta
            self._store_rows(current)
        parts = self.evicted_touched + [current]
        updated = RowBatch.concat(parts)
        if len(self.evicted_touched):
            # A row evicted and fetched back later appears twice: keep the newest (last) copy.
            last = torch.zeros(len(updated), dtype=torch.bool, device=self.device)
            uniq, inverse = torch.unique(updated.fids, return_inverse=True)
            newest = torch.zeros(len(uniq), dtype=torch.int64, device=self.device).scatter_reduce_(
                0, inverse, torch.arange(len(updated), device=self.device), reduce="amax", include_self=False)
            last[newest] = True
            updated = updated.select(last)
        removed = torch.cat(self.removed_fids) if self.removed_fids else torch.empty(0, dtype=torch.int64,
                                                                                   device=self.device)
        self._clear_delta()
        return Delta(updated, removed)

    def write_back(self) -> int:
        """Write the rows touched since the last delta to the backing store (they stay cached and
        touched); returns how many. With a store, ``take_delta`` and ``reset_delta`` do this too."""
        if self.store is None:
            return 0
        _, keys, rows = self._live()
        touched = self.touched[rows]
        self._store_rows(self._read_rows(rows[touched], keys[touched]))
        return int(touched.sum())

    def _store_rows(self, batch: RowBatch) -> None:
        """Put rows to the store and wait until it has them (a write-behind store acknowledges later)."""
        self.store.put_rows(batch)
        self.store.flush()

    def reset_delta(self) -> None:
        """Start the next delta here (e.g. after a full snapshot, which holds every row); with a
        backing store, the touched rows are written back first."""
        self.write_back()
        self._clear_delta()

    def _clear_delta(self) -> None:
        self.touched.zero_()
        self.evicted_touched, self.removed_fids = [], []

    def all_rows(self) -> RowBatch:
        """Every live row, ordered by fid."""
        _, keys, rows = self._live()
        order = torch.argsort(keys)
        return self._read_rows(rows[order], keys[order])

    # RowStore protocol: a table on host memory is the default backing store of a bounded one.

    persistent = False  # (it ends with the process)

    def flush(self) -> None:
        """Writes to a table are done when ``put_rows`` returns."""

    def get_rows(self, fids: torch.Tensor) -> tuple[torch.Tensor, RowBatch]:
        rows = self.lookup(fids)
        found = rows >= 0
        return found, self._read_rows(rows[found], fids.to(self.device)[found])

    def put_rows(self, batch: RowBatch) -> None:
        batch = batch.to(self.device)
        rows, _ = self._find(batch.fids)
        present = rows >= 0
        if bool(present.any()):
            self._write_rows(rows[present], batch.select(present))
        absent = ~present
        if bool(absent.any()):
            new_rows = self._allocate_rows(int(absent.sum()))
            self._write_rows(new_rows, batch.select(absent))
            self._insert_index(batch.fids[absent], new_rows)
        if len(batch):
            self.data_time_ms = max(self.data_time_ms, int(batch.last_seen_ms.max()))

    def delete(self, fids: torch.Tensor) -> int:
        """Free the rows of ``fids`` (no delta bookkeeping); returns how many were present."""
        fids = torch.unique(fids.to(self.device))
        rows, positions = self._find(fids, want_positions=True)
        present = rows >= 0
        self._free(positions[present], rows[present])
        return int(present.sum())

    # ---------------------------------------------------------------------------------------
    # memory accounting

    def memory_bytes(self) -> dict[str, int]:
        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        pool = sum(size(t) for t in (self.embeddings, self.state, self.last_seen_ms, self.counts, self.touched))
        return {
            "index": size(self.index_keys) + size(self.index_rows),
            "rows": pool + size(self.free_rows),
            "filter": self.sketch.memory_bytes() if self.sketch is not None else 0,
        }

    @property
    def payload_bytes_per_entry(self) -> int:
        """Embedding + optimiser state bytes of one row (what a perfect table would hold)."""
        return 4 * (self.dim + self.state_width)

    def bytes_per_entry(self) -> float:
        """Index + row-pool bytes per live entry (the frequency filter is reported apart)."""
        memory = self.memory_bytes()
        return (memory["index"] + memory["rows"]) / max(1, self.size)
