"""The project's 64-bit hashes, vectorised in numpy (``trainer.hashing.mix64`` is the torch
twin of ``splitmix64``, the same bits; tested equal).

* ``splitmix64(x, seed)``: ``z = (x ^ seed) + GAMMA``, then the finaliser
  ``z ^= z >> 30; z *= M1; z ^= z >> 27; z *= M2; z ^= z >> 31`` (wrapping mod 2**64) - a
  bijection on 64-bit values; feature ids, sampling and the synthetic generator use it;
* ``fnv1a64(strings)``: FNV-1a of each string's UTF-8 bytes - join keys and their shards.

>>> splitmix64(np.array([0, 1], np.uint64)).tolist()
[16294208416658607535, 10451216379200822465]
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (the golden ratio in 64 bits)
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def splitmix64(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """splitmix64 of ``values ^ seed`` as uint64 (numpy, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64)
        if seed:
            z = z ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
        z = z + np.uint64(GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(M2)
        return z ^ (z >> np.uint64(31))


def fnv1a64(strings: pa.Array) -> np.ndarray:
    """FNV-1a (64-bit) of each string's UTF-8 bytes, vectorised over the column (one pass per byte position)."""
    if isinstance(strings, pa.ChunkedArray):  # (a table's column: pa.array() would go through Python objects)
        strings = strings.combine_chunks()
    elif not isinstance(strings, pa.Array):
        strings = pa.array(strings, pa.string())
    n = len(strings)
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int32)[strings.offset:strings.offset + n + 1]
    data = np.frombuffer(strings.buffers()[2], dtype=np.uint8) if n and strings.buffers()[2] is not None \
        else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    hashes = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for position in range(int(lengths.max(initial=0))):
            rows = np.flatnonzero(lengths > position)
            hashes[rows] = (hashes[rows] ^ data[starts[rows] + position].astype(np.uint64)) * _FNV_PRIME
    return hashes
