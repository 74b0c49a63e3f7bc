"""The join key and its shard, one definition for every path.

An impression and its actions meet on ``request_id \\x1f item_id`` (unit separator: ids may hold
any printable text); the key's shard is ``fnv1a64(key) % shards``, the same in the Beam and
Flink jobs and in the replay's spill files.

>>> join_key("r1", "i9") == join_keys(pa.array(["r1"]), pa.array(["i9"]))[0].as_py()
True
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.hashing import fnv1a64

SEPARATOR = "\x1f"


def join_key(request_id: str, item_id: str) -> str:
    """The join key of one event."""
    return f"{request_id}{SEPARATOR}{item_id}"


def join_keys(request_ids: pa.Array, item_ids: pa.Array) -> pa.Array:
    """The join keys of two id columns, as one string column."""
    return pc.binary_join_element_wise(request_ids, item_ids, SEPARATOR)


def key_shards(keys: pa.Array, shards: int) -> np.ndarray:
    """The shard (int64 in [0, shards)) of each join key."""
    return (fnv1a64(keys) % np.uint64(shards)).astype(np.int64)
