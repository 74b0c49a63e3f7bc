"""The exact-key index of the collisionless table (Monolith): bucketized cuckoo hashing, fid -> row.

``num_buckets`` buckets x 4 slots of (fid, row). A fid may live in two buckets:
``b1 = fastrange(lo32(h), B)`` and ``b2 = (f - b1) mod B`` with ``f = fastrange(hi32(h), B)``,
``h = mix64(fid)``. ``b -> f - b`` is an involution, so a fid's other bucket follows from the
bucket it sits in and its hash alone (the partial-key trick).

Inserts are placed in batches: each pending fid takes a free slot of the emptier of its two
buckets (ranked within the batch so no two take the same slot), then of the other; the rest
move an occupant of one of their buckets to a free slot of
its other bucket (a displacement path of two, found for all at once); the few left displace a
random occupant, which moves on to *its* other bucket, for up to ``stash_after_rounds`` rounds. The few fids
still pending then go to a small *stash* (``STASH_BUCKETS`` x 4 slots after the last bucket,
probed by full comparison when a fid is in neither of its buckets), which cuts the long tail of
displacement rounds - each a few dozen small kernels, costly on a GPU. While more are pending
than the stash has room for, displacement goes on if the stash is at least half free; otherwise,
or after ``max_kick_rounds``, the index grows (rehash into ``growth`` x buckets, which empties the
stash). The index also grows when its load passes ``max_load``. All of it is vectorised torch, so
it runs on CPU and CUDA alike. Memory: 12 bytes per slot (int64 key, int32 row).
"""
from __future__ import annotations

import torch

from trainer.hashing import fast_range, mix64

EMPTY = -1
SLOTS_PER_BUCKET = 4
STASH_BUCKETS = 128  # stash buckets (x 4 slots) after the hashed buckets


class CuckooIndex:
    """Unique int64 keys -> int32 rows; two distinct keys never share a slot."""

    def __init__(self, num_buckets: int, *, seed: int = 0, max_load: float = 0.92, growth: float = 2.0,
                 max_kick_rounds: int = 64, stash_after_rounds: int = 10, device: str | torch.device = "cpu"):
        self.seed, self.max_load, self.growth = seed, max_load, growth
        self.max_kick_rounds, self.stash_after_rounds = max_kick_rounds, stash_after_rounds
        self.device = torch.device(device)
        # The displacement choices have their own random stream: a key's row never depends on them.
        self.placement_generator = torch.Generator(device=self.device)
        self.placement_generator.manual_seed(seed ^ 0x5EED)
        self.size = 0
        self.stats = {"grows": 0, "stashed": 0}
        self._allocate(max(2, num_buckets))

    def __len__(self) -> int:
        return self.size

    @property
    def load_factor(self) -> float:
        return self.size / (self.num_buckets * SLOTS_PER_BUCKET)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.rows))

    def _allocate(self, num_buckets: int) -> None:
        """Keys [B + stash, 4] int64 (EMPTY = -1) and rows [B + stash, 4] int32."""
        self.num_buckets = num_buckets
        total = num_buckets + STASH_BUCKETS
        self.keys = torch.full((total, SLOTS_PER_BUCKET), EMPTY, dtype=torch.int64, device=self.device)
        self.rows = torch.zeros((total, SLOTS_PER_BUCKET), dtype=torch.int32, device=self.device)
        self.stash_used = False  # set when a key goes to the stash; the stash is probed only then

    def clear(self, positions: torch.Tensor) -> None:
        """Empty the slots at flat ``positions`` (from ``find`` or ``live``)."""
        self.keys[positions // SLOTS_PER_BUCKET, positions % SLOTS_PER_BUCKET] = EMPTY
        self.size -= len(positions)

    def _hash(self, fids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b1, f): the first bucket and the involution constant; the other bucket is (f - b) mod B."""
        h = mix64(fids, self.seed)
        b1 = fast_range(h & 0xFFFFFFFF, self.num_buckets)
        f = fast_range((h >> 32) & 0xFFFFFFFF, self.num_buckets)
        return b1, f

    def _set(self, buckets: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor) -> None:
        self.keys[buckets, slots] = keys
        self.rows[buckets, slots] = rows.to(torch.int32)

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
        hit = self.keys.index_select(0, buckets) == fids.unsqueeze(1)
        pattern = hit.view(torch.uint8).view(torch.int32).squeeze(1)
        slot = torch.div(torch.frexp(pattern.to(torch.float32)).exponent - 1, 8, rounding_mode="floor")
        return pattern != 0, slot

    def find(self, fids: torch.Tensor, want_positions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
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
                stash = self.keys[self.num_buckets:].reshape(-1)
                hit = fids.index_select(0, missing).unsqueeze(1) == stash.unsqueeze(0)  # [missing, stash slots]
                found[missing] = hit.any(dim=1)
                positions[missing] = self.num_buckets * SLOTS_PER_BUCKET + hit.to(torch.uint8).argmax(dim=1)
        positions = torch.where(found, positions, torch.full_like(positions, -1))
        rows = self.rows.view(-1).index_select(0, positions.clamp(min=0)).long()
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
        free = self.keys.index_select(0, sorted_buckets) == EMPTY
        free_rank = free.cumsum(dim=1) - 1
        ok = rank < free_rank[:, -1] + 1
        slot = (free & (free_rank == rank.unsqueeze(1))).to(torch.uint8).argmax(dim=1)
        chosen = order[ok]
        self._set(sorted_buckets[ok], slot[ok], keys[chosen], rows[chosen])
        placed = torch.zeros(len(keys), dtype=torch.bool, device=self.device)
        placed[chosen] = True
        return placed

    def _free_slots(self, buckets: torch.Tensor) -> torch.Tensor:
        return (self.keys.index_select(0, buckets) == EMPTY).sum(dim=1)

    def _place(self, keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Insert absent, unique keys; returns the (keys, rows) that found no place (to grow for).
        A batch larger than an eighth of the buckets (a rebuild) is placed in chunks of that
        size, so that each chunk's two choices see the buckets the chunks before it filled."""
        chunk = max(1024, self.num_buckets // 8)
        if len(keys) <= chunk:
            return self._place_chunk(keys, rows)
        left = [self._place_chunk(keys[at:at + chunk], rows[at:at + chunk]) for at in range(0, len(keys), chunk)]
        return torch.cat([k for k, _ in left]), torch.cat([r for _, r in left])

    def _place_chunk(self, keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b1, f = self._hash(keys)
        b2 = self._other_bucket(f, b1)
        # The emptier of its two buckets first (two choices): buckets fill evenly, so at a given
        # load few are full and few keys need displacing.
        target = torch.where(self._free_slots(b2) > self._free_slots(b1), b2, b1)
        for round_ in range(self.max_kick_rounds):
            if round_ >= self.stash_after_rounds and len(keys):
                keys, rows, stash_free = self._to_stash(keys, rows)  # all or nothing
                if len(keys) and stash_free < STASH_BUCKETS * SLOTS_PER_BUCKET // 2:
                    return keys, rows  # the stash is filling up: grow (which empties it)
            if len(keys) == 0:
                break
            placed = self._fill_free(keys, rows, target)
            keys, rows, target, f = keys[~placed], rows[~placed], target[~placed], f[~placed]
            if len(keys) == 0:
                break
            if round_ == 0:  # (later, a pending key's other bucket is the full one it just left)
                other = self._other_bucket(f, target)
                placed = self._fill_free(keys, rows, other)
                keys, rows, target, f = keys[~placed], rows[~placed], target[~placed], f[~placed]
                if len(keys) == 0:
                    break
            placed = self._move_aside(keys, rows, target, f)
            keys, rows, target, f = keys[~placed], rows[~placed], target[~placed], f[~placed]
            if len(keys) == 0:
                break
            # Still pending: displace one occupant of the target bucket per pending key.
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
            victim_keys = self.keys[kick_buckets, kick_slots]
            victim_rows = self.rows[kick_buckets, kick_slots].long()
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

    def _move_aside(self, keys: torch.Tensor, rows: torch.Tensor, target: torch.Tensor,
                    f: torch.Tensor) -> torch.Tensor:
        """Pending keys whose buckets are both full: move one of the 8 occupants of the two to a
        free slot of *its* other bucket (the one with most free slots) and take its place - a
        displacement path of length two found at once, where a random walk takes rounds.
        Returns the placed mask."""
        n = len(keys)
        buckets = torch.stack([target, self._other_bucket(f, target)], dim=1).repeat_interleave(SLOTS_PER_BUCKET, 1)
        slots = torch.arange(SLOTS_PER_BUCKET, device=self.device).repeat(2).expand(n, -1)
        occupants = self.keys[buckets, slots]  # [n, 8]
        _, occupant_f = self._hash(occupants.reshape(-1))
        destination = self._other_bucket(occupant_f.view(n, -1), buckets)
        free = self._free_slots(destination.reshape(-1)).view(n, -1) * (occupants != EMPTY)
        choice = free.argmax(dim=1, keepdim=True)
        movable = torch.nonzero(free.gather(1, choice).squeeze(1) > 0).squeeze(1)
        placed = torch.zeros(n, dtype=torch.bool, device=self.device)
        if len(movable) == 0:
            return placed
        pick = choice.squeeze(1).index_select(0, movable)
        source_bucket, source_slot = buckets[movable, pick], slots[movable, pick]
        # one pending key per occupant (two keys sharing a full bucket may pick the same one)
        source = source_bucket * SLOTS_PER_BUCKET + source_slot
        order = torch.argsort(source, stable=True)
        first = torch.ones(len(order), dtype=torch.bool, device=self.device)
        first[1:] = source[order][1:] != source[order][:-1]
        keep = order[first]
        movable, source_bucket, source_slot = movable[keep], source_bucket[keep], source_slot[keep]
        pick = pick[keep]
        moved = self._fill_free(occupants[movable, pick], self.rows[source_bucket, source_slot].long(),
                                destination[movable, pick])
        movable = movable[moved]
        self._set(source_bucket[moved], source_slot[moved], keys[movable], rows[movable])
        placed[movable] = True
        return placed

    def _to_stash(self, keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Put pending keys into free stash slots if they all fit; returns what is left and the
        free stash slots before."""
        stash = self.keys[self.num_buckets:].reshape(-1)
        free = torch.nonzero(stash == EMPTY).squeeze(1)
        if len(free) < len(keys):
            return keys, rows, len(free)
        position = self.num_buckets * SLOTS_PER_BUCKET + free[:len(keys)]
        self._set(position // SLOTS_PER_BUCKET, position % SLOTS_PER_BUCKET, keys, rows)
        self.stash_used = True
        self.stats["stashed"] += len(keys)
        return keys[:0], rows[:0], len(free)

    def live(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, keys, rows) of every occupied index slot."""
        occupied = torch.nonzero(self.keys != EMPTY)
        buckets, slots = occupied[:, 0], occupied[:, 1]
        positions = buckets * SLOTS_PER_BUCKET + slots
        return positions, self.keys[buckets, slots], self.rows[buckets, slots].long()

    def _rebuild(self, num_buckets: int, extra_keys: torch.Tensor, extra_rows: torch.Tensor) -> None:
        _, keys, rows = self.live()
        keys, rows = torch.cat([keys, extra_keys]), torch.cat([rows, extra_rows])
        while True:
            self._allocate(num_buckets)
            left, _ = self._place(keys, rows)
            self.stats["grows"] += 1
            if len(left) == 0:
                return
            num_buckets = int(num_buckets * self.growth)

    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Index absent, unique ``keys`` at ``rows``, growing when the load would pass ``max_load``."""
        needed = self.size + len(keys)
        if needed > self.max_load * self.num_buckets * SLOTS_PER_BUCKET:
            # Grow to a load of max_load / growth: room for the next inserts, few kicks.
            target_load = self.max_load / self.growth
            buckets = max(int(self.num_buckets * self.growth) + 1,
                          int(needed / (target_load * SLOTS_PER_BUCKET)) + 1)
            self._rebuild(buckets, keys, rows)
        else:
            left_keys, left_rows = self._place(keys, rows)
            if len(left_keys):
                self._rebuild(int(self.num_buckets * self.growth) + 1, left_keys, left_rows)
        self.size += len(keys)
