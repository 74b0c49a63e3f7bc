"""The cuckoo index (trainer.cuckoo_index) on its own: exact keys, growth, the stash, clearing."""
import torch

from trainer.cuckoo_index import EMPTY, SLOTS_PER_BUCKET, CuckooIndex


def _keys(n: int, seed: int = 0) -> torch.Tensor:
    keys = torch.unique(torch.randint(0, 1 << 62, (n,), generator=torch.Generator().manual_seed(seed)))
    return keys[torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed + 1))]


def test_every_key_is_found_at_its_row_after_growth_and_none_shares_a_slot():
    index = CuckooIndex(4, seed=3, growth=1.3)
    keys = _keys(50_000)
    rows = torch.arange(len(keys))
    for part in torch.split(torch.arange(len(keys)), 7_000):  # batches, each absent and unique
        index.insert(keys[part], rows[part])
    assert len(index) == len(keys) and index.stats["grows"] > 3 and index.load_factor <= index.max_load
    found, _ = index.find(keys)
    assert torch.equal(found, rows)
    positions, live_keys, live_rows = index.live()
    assert len(torch.unique(positions)) == len(keys)
    assert torch.equal(torch.sort(live_keys).values, torch.sort(keys).values)
    assert torch.equal(live_rows[torch.argsort(live_keys)], rows[torch.argsort(keys)])
    absent, _ = index.find(_keys(1_000, seed=9))
    assert bool((absent == -1).all())  # (2^62 keys: a collision with the inserted ones is negligible)


def test_cleared_slots_are_empty_and_reused():
    index = CuckooIndex(64, seed=1)
    keys = _keys(150)
    index.insert(keys, torch.arange(len(keys)))
    _, positions = index.find(keys[:50], want_positions=True)
    index.clear(positions)
    assert len(index) == len(keys) - 50
    assert bool((index.find(keys[:50])[0] == -1).all())
    assert torch.equal(index.find(keys[50:])[0], torch.arange(50, len(keys)))
    assert bool((index.keys.view(-1)[positions] == EMPTY).all())
    index.insert(keys[:50], torch.arange(1_000, 1_050))
    assert torch.equal(index.find(keys[:50])[0], torch.arange(1_000, 1_050))


def test_pending_keys_go_to_the_stash_and_are_found_there():
    index = CuckooIndex(4, seed=0, stash_after_rounds=0, max_load=0.98)
    keys = _keys(15)  # fits the 16 hashed slots by load, but displacement is skipped: some stash
    index.insert(keys, torch.arange(len(keys)))
    assert index.stats["stashed"] > 0 and index.stash_used
    assert torch.equal(index.find(keys)[0], torch.arange(len(keys)))
    stash = index.keys[index.num_buckets:].reshape(-1)
    assert int((stash != EMPTY).sum()) == index.stats["stashed"]  # nothing has left the stash yet
    assert index.memory_bytes() == (index.num_buckets + 128) * SLOTS_PER_BUCKET * 12


def test_a_key_whose_buckets_are_full_takes_the_place_of_an_occupant_moved_to_its_other_bucket():
    index = CuckooIndex(64, seed=2)
    key = _keys(1, seed=5)
    b1, f = index._hash(key)
    b2 = index._other_bucket(f, b1)
    candidates = _keys(200_000, seed=6)
    c1, cf = index._hash(candidates)
    c2 = index._other_bucket(cf, c1)
    # 8 keys that sit in the new key's two buckets, each with its other bucket elsewhere (empty)
    occupants = []
    for bucket in (int(b1), int(b2)):
        sits = torch.nonzero((c1 == bucket) & (c2 != b1) & (c2 != b2)).squeeze(1)[:SLOTS_PER_BUCKET]
        assert len(sits) == SLOTS_PER_BUCKET
        index._set(torch.full((SLOTS_PER_BUCKET,), bucket), torch.arange(SLOTS_PER_BUCKET), candidates[sits],
                   torch.arange(len(occupants) * 4, len(occupants) * 4 + 4))
        occupants.append(candidates[sits])
    index.size = 2 * SLOTS_PER_BUCKET
    occupants = torch.cat(occupants)
    assert int(index._free_slots(torch.cat([b1, b2])).sum()) == 0
    placed = index._move_aside(key, torch.tensor([100]), b1, f)
    assert bool(placed.all())
    index.size += 1
    assert torch.equal(index.find(occupants)[0], torch.arange(8)) and int(index.find(key)[0]) == 100
    assert len(torch.unique(index.live()[0])) == 9


def test_inserts_at_high_load_rarely_need_the_stash():
    index = CuckooIndex(2_000, seed=4, max_load=0.95)
    keys = _keys(7_400)  # 0.925 of the 8,000 slots, in batches of 200
    for part in torch.split(torch.arange(len(keys)), 200):
        index.insert(keys[part], part)
    assert index.stats["grows"] == 0 and index.stats["stashed"] < 20
    assert torch.equal(index.find(keys)[0], torch.arange(len(keys)))
