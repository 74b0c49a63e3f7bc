"""Feature extraction from the spec, on Arrow record batches: impressions -> fids and dense values.

``fid = slot_id << 48 | hash48(value)``, stable across processes, runs and machines:

* strings: the first 8 bytes of blake2b(value), little-endian, low 48 bits;
* integers and booleans: splitmix64(value), low 48 bits;
* bucketized numerics: splitmix64(bucket index) with ``bucket = #(boundaries <= value)``;
* crosses: ``splitmix64(h_a * 0x9E3779B1 + h_b)`` folded over the crossed slots' value hashes,
  one fid per combination (a multi-valued slot contributes each of its values);
* a missing value (null, empty list) hashes to 0: the slot's default fid, or - with
  ``missing: dead_letter`` - the impression goes to the dead letters naming slot and field.
  A value that hashes to 0 is moved to 1, so 0 means "missing" only.

Dense features are normalised as the spec says; a missing one takes its ``default``.
String columns are dictionary-encoded first, so each distinct string is hashed once per batch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.dead_letters import DeadLetter, record_json
from schemas.events import arrow_schema, load_schema
from schemas.fids import HASH_BITS, HASH_MASK
from schemas.hashing import splitmix64
from schemas.spec_types import FeatureSpec, MissingPolicy, Normalization, SlotKind, SlotSpec

_MASK48 = np.uint64(HASH_MASK)
_CROSS_MULTIPLIER = np.uint64(0x9E3779B1)


def hash48_string(value: str) -> int:
    """The low 48 bits of blake2b-64 of the UTF-8 value (never 0, which means "missing").

    >>> hash48_string("Comedy") == hash48_string("Comedy") != hash48_string("Drama")
    True
    """
    h = int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") & HASH_MASK
    return h or 1


def _nonzero(h: np.ndarray) -> np.ndarray:
    return np.where(h == 0, np.uint64(1), h)


def hash_array(array: pa.Array) -> np.ndarray:
    """hash48 of each value of a flat Arrow array (uint64; 0 where null)."""
    if len(array) == 0:
        return np.zeros(0, dtype=np.uint64)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type) or pa.types.is_dictionary(array.type):
        encoded = array if pa.types.is_dictionary(array.type) else pc.dictionary_encode(array)
        table = np.array([hash48_string(v) for v in encoded.dictionary.to_pylist()] or [0], dtype=np.uint64)
        indices = encoded.indices.fill_null(0).to_numpy(zero_copy_only=False)
        hashes = table[indices]
    elif pa.types.is_integer(array.type) or pa.types.is_boolean(array.type):
        values = array.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        hashes = _nonzero(splitmix64(values.view(np.uint64)) & _MASK48)
    else:
        raise TypeError(f"cannot hash values of type {array.type} (categorical slots take strings or integers)")
    if array.null_count:
        hashes = np.where(array.is_null().to_numpy(zero_copy_only=False), np.uint64(0), hashes)
    return hashes


@dataclass
class _Values:
    """Per-row variable-length values of one slot: row r owns values[offsets[r]:offsets[r + 1]]."""

    offsets: np.ndarray  # int64 [n + 1]
    hashes: np.ndarray  # uint64 [m]; 0 = missing

    @classmethod
    def single(cls, hashes: np.ndarray) -> "_Values":
        return cls(np.arange(len(hashes) + 1, dtype=np.int64), hashes)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def missing_rows(self) -> np.ndarray:
        """Rows with no value at all, or only missing ones."""
        present = np.zeros(len(self.offsets) - 1, dtype=np.int64)
        rows = np.repeat(np.arange(len(present)), self.counts)
        np.add.at(present, rows[self.hashes != 0], 1)
        return present == 0

    def with_defaults(self) -> "_Values":
        """Empty rows get one missing (0) value: every row has at least the default fid."""
        counts = self.counts
        if counts.min(initial=1) > 0:
            return self
        new_counts = np.maximum(counts, 1)
        offsets = np.concatenate([[0], np.cumsum(new_counts)])
        hashes = np.zeros(offsets[-1], dtype=np.uint64)
        rows = np.repeat(np.arange(len(counts)), counts)
        within = np.arange(len(self.hashes)) - self.offsets[rows]
        hashes[offsets[rows] + within] = self.hashes
        return _Values(offsets, hashes)


def _cross(a: _Values, b: _Values) -> _Values:
    """Per row, every pair (x, y) of a's and b's values, hashed; a pair with a missing side is missing."""
    ca, cb = a.counts, b.counts
    counts = ca * cb
    offsets = np.concatenate([[0], np.cumsum(counts)])
    rows = np.repeat(np.arange(len(ca)), counts)
    k = np.arange(offsets[-1]) - offsets[rows]
    cb_rows = cb[rows]
    x = a.hashes[a.offsets[rows] + k // np.maximum(cb_rows, 1)]
    y = b.hashes[b.offsets[rows] + k % np.maximum(cb_rows, 1)]
    with np.errstate(over="ignore"):
        h = _nonzero(splitmix64(x * _CROSS_MULTIPLIER + y) & _MASK48)
    return _Values(offsets, np.where((x == 0) | (y == 0), np.uint64(0), h))


class FeatureExtractor:
    """Turns impressions (an Arrow table in the spec's impression schema) into fids and dense values."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.impression_schema = load_schema(spec.events.impression)
        self.arrow_schema = arrow_schema(self.impression_schema)
        self.dense_names = [d.name for d in spec.dense]

    def table_from_records(self, records: list[dict]) -> pa.Table:
        return pa.Table.from_pylist(records, schema=self.arrow_schema)

    def _slot_values(self, table: pa.Table, slot: SlotSpec, done: dict[str, _Values]) -> _Values:
        if slot.kind is SlotKind.CROSS:
            values = done[slot.source[0]]
            for name in slot.source[1:]:
                values = _cross(values, done[name])
            return values
        column = table.column(slot.source[0]).combine_chunks()
        if slot.kind is SlotKind.MULTI_VALUED:
            offsets = column.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
            flat = column.flatten()
            if column.null_count:  # a null list holds no values
                lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            return _Values(offsets, hash_array(flat))
        if slot.kind is SlotKind.BUCKETIZED:
            values = column.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
            buckets = np.searchsorted(np.asarray(slot.boundaries), values, side="right").astype(np.uint64)
            hashes = _nonzero(splitmix64(buckets) & _MASK48)
            return _Values.single(np.where(np.isnan(values), np.uint64(0), hashes))
        return _Values.single(hash_array(column))

    def _dense(self, table: pa.Table) -> np.ndarray:
        n = table.num_rows
        out = np.zeros((n, len(self.spec.dense)), dtype=np.float32)
        for j, feature in enumerate(self.spec.dense):
            column = table.column(feature.source).cast(pa.float64())
            x = column.fill_null(feature.default).to_numpy(zero_copy_only=False)
            if feature.normalization is Normalization.STANDARD:
                x = (x - feature.mean) / feature.std
            elif feature.normalization is Normalization.MINMAX:
                x = np.clip((x - feature.min) / (feature.max - feature.min), 0.0, 1.0)
            elif feature.normalization is Normalization.LOG1P:
                x = np.log1p(np.maximum(x, 0.0))
            out[:, j] = x
        return out

    def extract(self, table: pa.Table) -> tuple[pa.ListArray, pa.ListArray, np.ndarray, list[DeadLetter]]:
        """(fids per row, dense per row, kept-row mask, dead letters) for an impression table.

        Rows of kept impressions only are in the returned arrays; rows where a ``dead_letter``
        slot has no value are left out and reported.
        """
        n = table.num_rows
        done: dict[str, _Values] = {}
        dead = np.zeros(n, dtype=bool)
        reasons: dict[int, str] = {}
        for slot in self.spec.slots:
            values = self._slot_values(table, slot, done)
            done[slot.name] = values
            if slot.missing is MissingPolicy.DEAD_LETTER:
                missing = values.missing_rows()
                for row in np.flatnonzero(missing & ~dead):
                    reasons[int(row)] = f"slot {slot.name!r}: no value in field(s) {list(slot.source)}"
                dead |= missing
        # Assemble row-major fids: row r holds its slots' values in spec order.
        per_slot = [done[s.name].with_defaults() for s in self.spec.slots]
        totals = np.zeros(n, dtype=np.int64)
        for values in per_slot:
            totals += values.counts
        row_start = np.concatenate([[0], np.cumsum(totals)])
        fids = np.zeros(row_start[-1], dtype=np.int64)
        before = np.zeros(n, dtype=np.int64)  # values of earlier slots in each row
        for slot, values in zip(self.spec.slots, per_slot):
            counts = values.counts
            rows = np.repeat(np.arange(n), counts)
            within = np.arange(len(values.hashes)) - values.offsets[rows]
            dest = row_start[rows] + before[rows] + within
            fids[dest] = (np.int64(slot.slot_id) << np.int64(HASH_BITS)) | values.hashes.astype(np.int64)
            before += counts
        dense = self._dense(table)
        keep = ~dead
        letters = [DeadLetter("features", "missing_value", reason, record=record_json(table.slice(row, 1).to_pylist()[0]))
                   for row, reason in sorted(reasons.items())]
        fid_lists = pa.ListArray.from_arrays(pa.array(row_start, pa.int32()), pa.array(fids))
        dense_lists = pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32) * len(self.dense_names)), pa.array(dense.reshape(-1)))
        if dead.any():
            kept = pa.array(np.flatnonzero(keep))
            fid_lists, dense_lists = fid_lists.take(kept), dense_lists.take(kept)
        return fid_lists, dense_lists, keep, letters
