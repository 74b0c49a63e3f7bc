"""The 64-bit feature-id layout (Monolith v2): ``fid = slot_id << 48 | hash48(value)``.

15 bits of slot id above 48 bits of value hash keep every fid non-negative in an int64,
and the slot is recovered from a fid alone as ``fid >> 48``.

>>> make_fid(3, 0x1234)
844424930136628
>>> slot_of(make_fid(3, 0x1234))
3
"""
SLOT_BITS = 15
HASH_BITS = 48
MAX_SLOT_ID = (1 << SLOT_BITS) - 1
HASH_MASK = (1 << HASH_BITS) - 1


def make_fid(slot_id: int, value_hash: int) -> int:
    if not 1 <= slot_id <= MAX_SLOT_ID:
        raise ValueError(f"slot id must be in [1, {MAX_SLOT_ID}], got {slot_id}")
    return (slot_id << HASH_BITS) | (value_hash & HASH_MASK)


def slot_of(fid: int) -> int:
    return fid >> HASH_BITS
