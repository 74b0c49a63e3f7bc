"""The collisionless embedding table (Monolith): fid -> row with no two fids ever sharing a row.

Index: ``trainer.cuckoo_index.CuckooIndex`` (bucketized cuckoo hashing with a stash).

Rows: a pool of embedding rows (``dim`` floats), optimiser state (``state_width`` floats),
last-seen event time (int64 ms), occurrence count (int32) and a touched flag, reused through a
free list.

Per-slot policies (``trainer.table_config``): expiry on data time, admission after
``min_count`` occurrences (a count-min sketch counts the not-yet-admitted; it is not reset when a
row expires or is removed, so a returning fid that had passed the threshold is admitted at once),
and the initializer of new rows (a function of fid and seed: ``trainer.initializers``). Optionally the table is bounded (``max_rows``) and sits in front
of a backing ``RowStore``: misses are fetched from it and the least-recently-seen rows are written
back and evicted. ``take_delta`` hands out the rows touched and fids removed since the last one.
"""
from __future__ import annotations

import torch

from schemas.fids import HASH_BITS, MAX_SLOT_ID
from trainer.cuckoo_index import CuckooIndex
from trainer.frequency_filter import CountMinSketch
from trainer.initializers import initial_rows
from trainer.rows import Delta, RowBatch, RowStore, max_per_group
from trainer.table_config import NEVER, SlotPolicy, TableConfig


class EmbeddingTable:
    """Collisionless fid -> row table; see the module docstring for the design."""

    def __init__(self, config: TableConfig, store: RowStore | None = None):
        if config.max_rows is not None and store is None:
            raise ValueError("a bounded table (max_rows) needs a backing store to evict to")
        self.config = config
        self.store = store
        self.device = torch.device(config.device)
        self.dim, self.state_width = config.dim, config.state_width
        self.index = CuckooIndex(config.initial_buckets, seed=config.seed, max_load=config.max_load,
                                 growth=config.growth, max_kick_rounds=config.max_kick_rounds,
                                 stash_after_rounds=config.stash_after_rounds, device=self.device)
        rows = max(1, config.initial_rows if config.max_rows is None else min(config.initial_rows, config.max_rows))
        self.embeddings = torch.zeros(rows, self.dim, dtype=getattr(torch, config.embedding_dtype), device=self.device)
        self.state = torch.zeros(rows, self.state_width, device=self.device)
        self.last_seen_ms = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.counts = torch.zeros(rows, dtype=torch.int32, device=self.device)
        self.touched = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self.next_row = 0  # rows below this were handed out at least once
        self.free_rows = torch.empty(0, dtype=torch.int64, device=self.device)
        self.rows_freed = 0  # counts frees: a fid -> row mapping read before a change is stale after it
        self.data_time_ms = 0
        self.removed_fids: list[torch.Tensor] = []
        self.evicted_touched: list[RowBatch] = []
        self._policy_tables()
        self.sketch = (CountMinSketch(config.filter_width, config.filter_depth, config.seed, self.device)
                       if self._uses_filter else None)
        self.stats = {"inserts": 0, "filtered": 0, "expired": 0, "evicted": 0, "fetched": 0,
                      "lookups": 0, "hits": 0}

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
        """Each slot's initializer, as a function of (fid, table seed) alone (``trainer.initializers``)."""
        slots, choice = torch.unique(fids >> HASH_BITS, return_inverse=True)
        policies = [self.policy(slot) for slot in slots.tolist()]
        return initial_rows(fids, self.dim, [(policy.initializer, policy.init_scale) for policy in policies],
                            choice, self.config.seed)

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
        self.index.clear(positions)
        self.touched[rows] = False
        self.free_rows = torch.cat([self.free_rows, rows])

    # ---------------------------------------------------------------------------------------
    # public API

    def __len__(self) -> int:
        return self.index.size

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def load_factor(self) -> float:
        return self.index.load_factor

    def lookup(self, fids: torch.Tensor) -> torch.Tensor:
        """Rows of ``fids`` (-1 where absent). Read-only: no insert, no time or count update."""
        rows, _ = self.index.find(fids.to(self.device))
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
            times = max_per_group(times, inverse, len(fids))
        times = times.expand(len(fids)) if times.dim() == 0 else times
        rows = self.index.find(fids)[0] if rows is None or inverse is not None else rows.clone()
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
            self.index.insert(fids[fetched_mask], fetched_rows)
            rows[fetched_mask] = fetched_rows
            self.stats["fetched"] += n_fetched
        if n_new:
            new_fids = fids[new_mask]
            new_rows = self._allocate_rows(n_new)
            self.embeddings[new_rows] = self._initial_embeddings(new_fids).to(self.embeddings.dtype)
            self.state[new_rows] = self.config.state_init
            self.last_seen_ms[new_rows] = times[new_mask]
            self.counts[new_rows] = 0
            self.touched[new_rows] = True
            self.index.insert(new_fids, new_rows)
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
        positions, keys, rows = self.index.live()
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
            stored = self.store.expire_fids(now).to(self.device)
            # The store judged its copy, written back or evicted earlier; a row still cached
            # here was seen since (the cache's own copy did not expire): it lives, and its
            # fresher copy goes back to the store.
            cached = self.lookup(stored)
            live = cached >= 0
            if bool(live.any()):
                self._store_rows(self._read_rows(cached[live], stored[live]))
            # a written-back row expires in both tiers: count it once
            expired = torch.unique(torch.cat([expired, stored[~live]]))
        self._record_removed(expired)
        self.stats["expired"] += len(expired)
        return len(expired)

    def expire_fids(self, data_time_ms: int) -> torch.Tensor:
        """Free this table's expired rows (no delta bookkeeping); returns their fids."""
        if not self._uses_expiry:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        positions, keys, rows = self.index.live()
        limit = self.expire_by_slot[keys >> HASH_BITS]
        expired = (limit != NEVER) & (data_time_ms - self.last_seen_ms[rows] > limit)
        self._free(positions[expired], rows[expired])
        return keys[expired]

    def take_delta(self) -> Delta:
        """Rows touched (inserted or updated) since the last call, and fids removed; resets both.

        Exact: nothing is dropped however many rows were touched; rows evicted to the store after
        being touched are included with the values they were evicted with.
        """
        positions, keys, rows = self.index.live()
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
            newest = max_per_group(torch.arange(len(updated), device=self.device), inverse, len(uniq))
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
        _, keys, rows = self.index.live()
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
        _, keys, rows = self.index.live()
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
        rows, _ = self.index.find(batch.fids)
        present = rows >= 0
        if bool(present.any()):
            self._write_rows(rows[present], batch.select(present))
        absent = ~present
        if bool(absent.any()):
            new_rows = self._allocate_rows(int(absent.sum()))
            self._write_rows(new_rows, batch.select(absent))
            self.index.insert(batch.fids[absent], new_rows)
        if len(batch):
            self.data_time_ms = max(self.data_time_ms, int(batch.last_seen_ms.max()))

    def delete(self, fids: torch.Tensor) -> int:
        """Free the rows of ``fids`` (no delta bookkeeping); returns how many were present."""
        fids = torch.unique(fids.to(self.device))
        rows, positions = self.index.find(fids, want_positions=True)
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
            "index": self.index.memory_bytes(),
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
