"""The join of ``transforms.join`` on micro-batches of columns (numpy + Arrow), for throughput.

Same decisions as ``KeyJoin`` (the tests hold the two to the same output), made for a whole
micro-batch at once: string keys are matched with Arrow's hash lookups, label times are reduced
with numpy, and the watermark is advanced once per batch. Early positive emission is not done
here (use the per-key ``StreamJoiner`` for that).

State between batches, all columnar and bounded by the window:

* open impressions: key, time, row reference, first time of each label action (-1: none);
* tombstones of closed windows (key, impression time), kept until ``time + 2 * window``;
* held actions (no impression yet), until ``time + window``;
* seen actions ``key|type|time``, for duplicates, pruned with the impressions they belong to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.dead_letters import DeadLetter
from schemas.events import END_OF_TIME_MS
from transforms.join import JoinConfig, Joined
from transforms.keys import join_keys, key_shards

_EMPTY_KEYS = pa.array([], pa.string())


@dataclass
class _Open:
    keys: pa.Array
    times: np.ndarray  # int64
    refs: np.ndarray  # int64 row references supplied by the caller
    label_times: np.ndarray  # int64 [n, labels], -1 = no such action yet

    def take(self, index: np.ndarray) -> "_Open":
        return _Open(self.keys.take(pa.array(index, pa.int64())), self.times[index], self.refs[index],
                     self.label_times[index])


@dataclass
class ClosedImpressions:
    """Impressions whose window closed, as columns: what the join emits."""

    refs: np.ndarray  # the caller's row references
    times: np.ndarray  # impression event times (ms)
    label_times: np.ndarray  # [n, label actions]: first time of each action, -1 = none
    actions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.refs)

    def to_joined(self) -> list[Joined]:
        out = []
        for ref, time_ms, row in zip(self.refs.tolist(), self.times.tolist(), self.label_times.tolist()):
            out.append(Joined(ref, time_ms, {a: int(t >= 0) for a, t in zip(self.actions, row)},
                              {a: t for a, t in zip(self.actions, row) if t >= 0}))
        return out


def _flat(keys) -> pa.Array:
    """One contiguous string array (Arrow table columns come chunked)."""
    if isinstance(keys, pa.ChunkedArray):
        return keys.combine_chunks() if keys.num_chunks else pa.array([], pa.string())
    return keys


def _concat(a: pa.Array, b: pa.Array) -> pa.Array:
    return pa.concat_arrays([a, b]) if len(a) else b


class BatchJoiner:
    """Feed micro-batches of impressions and actions, each followed by a watermark."""

    def __init__(self, config: JoinConfig):
        if config.emit_positive_early:
            raise ValueError("BatchJoiner does not emit positives early; use transforms.join.StreamJoiner")
        self.config = config
        self.labels = list(config.label_actions)
        self.open = _Open(_EMPTY_KEYS, np.zeros(0, np.int64), np.zeros(0, np.int64),
                          np.zeros((0, len(self.labels)), np.int64))
        self.tomb_keys, self.tomb_times = _EMPTY_KEYS, np.zeros(0, np.int64)
        self.held_keys = _EMPTY_KEYS
        self.held_types = np.zeros(0, np.int64)
        self.held_times = np.zeros(0, np.int64)
        self.held_refs: list | pa.Table = []  # as given: rows of an actions table or a list
        self.seen = _EMPTY_KEYS  # "key|type|time" of every action still relevant
        self.seen_times = np.zeros(0, np.int64)

    @property
    def live_keys(self) -> int:
        return len(self.open.keys) + len(self.tomb_keys) + len(self.held_keys)

    def _letters(self, reason: str, keys: pa.Array, detail: str, refs) -> list[DeadLetter]:
        return [DeadLetter("join", reason, f"{detail} (key {k!r})", record=repr(r))
                for k, r in zip(keys.to_pylist(), _records(refs))]

    def add_tables(self, impressions: pa.Table, refs: np.ndarray, actions: pa.Table,
                   watermark_ms: int = -END_OF_TIME_MS) -> tuple[ClosedImpressions, list[DeadLetter]]:
        """``add`` for event tables: impressions (with their row references) and actions (their
        rows kept as an Arrow table, made records only for dead letters); by default the
        watermark does not move."""
        return self.add(join_keys(impressions.column("request_id"), impressions.column("item_id")),
                        impressions.column("event_time_ms").to_numpy(), refs,
                        join_keys(actions.column("request_id"), actions.column("item_id")),
                        actions.column("action_type").to_pylist(), actions.column("event_time_ms").to_numpy(),
                        actions, watermark_ms)

    def add(self, impression_keys: pa.Array, impression_times: np.ndarray, impression_refs: np.ndarray,
            action_keys: pa.Array, action_types: list[str], action_times: np.ndarray, action_refs: list,
            watermark_ms: int) -> tuple[ClosedImpressions, list[DeadLetter]]:
        """One micro-batch, then advance the watermark; returns (closed impressions, dead letters)."""
        impression_keys, action_keys = _flat(impression_keys), _flat(action_keys)
        letters: list[DeadLetter] = []
        window = self.config.window_ms
        # -- impressions: duplicates within the batch and against what is open or closed
        impression_times = np.asarray(impression_times, np.int64)
        impression_refs = np.asarray(impression_refs, np.int64)
        if len(impression_keys):
            duplicate = _repeats(impression_keys, _concat(self.open.keys, self.tomb_keys))
            if duplicate.any():
                index = np.flatnonzero(duplicate)
                letters += self._letters("duplicate_impression", impression_keys.take(pa.array(index)),
                                         "second impression for this key", impression_refs[index].tolist())
                keep = pa.array(np.flatnonzero(~duplicate))
                impression_keys = impression_keys.take(keep)
                impression_times, impression_refs = impression_times[~duplicate], impression_refs[~duplicate]
            n = len(impression_keys)
            self.open = _Open(_concat(self.open.keys, impression_keys),
                              np.concatenate([self.open.times, impression_times]),
                              np.concatenate([self.open.refs, impression_refs]),
                              np.concatenate([self.open.label_times, np.full((n, len(self.labels)), -1, np.int64)]))
        # -- actions: unlabelled, duplicates, then held ones and new ones meet the impressions
        type_index = {name: i for i, name in enumerate(self.labels)}
        codes = np.array([type_index.get(t, -1) for t in action_types], np.int64)
        action_times = np.asarray(action_times, np.int64)
        if len(codes) and (codes < 0).any():
            bad = np.flatnonzero(codes < 0)
            letters += [DeadLetter("join", "unlabelled_action", f"action type {action_types[i]!r} is not a label "
                                   f"{self.labels}", record=repr(record))
                        for i, record in zip(bad, _records(_pick(action_refs, bad)))]
            good = np.flatnonzero(codes >= 0)
            action_keys, codes, action_times = action_keys.take(pa.array(good)), codes[good], action_times[good]
            action_refs = _pick(action_refs, good)
        if len(codes):
            ids = pc.binary_join_element_wise(action_keys, pa.array(codes.astype(str)),
                                              pa.array(action_times.astype(str)), "|")
            duplicate = _repeats(ids, self.seen)
            if duplicate.any():
                index = np.flatnonzero(duplicate)
                letters += self._letters("duplicate_action", action_keys.take(pa.array(index)),
                                         "same action type and time seen before", _pick(action_refs, index))
                good = np.flatnonzero(~duplicate)
                action_keys, codes, action_times = action_keys.take(pa.array(good)), codes[good], action_times[good]
                action_refs = _pick(action_refs, good)
                ids = ids.take(pa.array(good))
            self.seen = _concat(self.seen, ids)
            self.seen_times = np.concatenate([self.seen_times, action_times])
        keys = _concat(self.held_keys, action_keys)
        codes = np.concatenate([self.held_types, codes])
        times = np.concatenate([self.held_times, action_times])
        refs = _append(self.held_refs, action_refs)
        open_match = _positions(keys, self.open.keys)
        tomb_match = _positions(keys, self.tomb_keys)
        impression_time = np.zeros(len(keys), np.int64)
        impression_time[open_match >= 0] = self.open.times[open_match[open_match >= 0]]
        impression_time[tomb_match >= 0] = self.tomb_times[tomb_match[tomb_match >= 0]]
        matched = (open_match >= 0) | (tomb_match >= 0)
        delay = times - impression_time
        orphan_now = matched & (delay > 2 * window)
        late = matched & ~orphan_now & ((delay > window) | (tomb_match >= 0))
        joins = (open_match >= 0) & ~orphan_now & ~late
        for reason, mask, detail in (("orphan_action", orphan_now, "more than twice the window after its impression"),
                                     ("late_action", late, "after its impression's window")):
            index = np.flatnonzero(mask)
            if len(index):
                letters += self._letters(reason, keys.take(pa.array(index)), detail, _pick(refs, index))
        if joins.any():
            # first time per (impression, action type): a scatter-min, with -1 (none) read as +inf
            never = np.iinfo(np.int64).max
            label_times = np.where(self.open.label_times < 0, never, self.open.label_times)
            np.minimum.at(label_times, (open_match[joins], codes[joins]), times[joins])
            self.open.label_times = np.where(label_times == never, -1, label_times)
        held = ~matched
        index = np.flatnonzero(held)
        self.held_keys = keys.take(pa.array(index))
        self.held_types, self.held_times = codes[index], times[index]
        self.held_refs = _pick(refs, index)
        return self._advance(watermark_ms, letters)

    def _advance(self, watermark_ms: int, letters: list[DeadLetter]) -> tuple[ClosedImpressions, list[DeadLetter]]:
        window = self.config.window_ms
        closing = self.open.times + window < watermark_ms
        closed = self.open.take(np.flatnonzero(closing))
        joined = ClosedImpressions(closed.refs, closed.times, closed.label_times, tuple(self.labels))
        if closing.any():
            self.tomb_keys = _concat(self.tomb_keys, closed.keys)
            self.tomb_times = np.concatenate([self.tomb_times, closed.times])
            self.open = self.open.take(np.flatnonzero(~closing))
        expired = self.tomb_times + 2 * window < watermark_ms
        if expired.any():
            keep = np.flatnonzero(~expired)
            self.tomb_keys, self.tomb_times = self.tomb_keys.take(pa.array(keep)), self.tomb_times[keep]
        orphans = self.held_times + window < watermark_ms
        if orphans.any():
            index = np.flatnonzero(orphans)
            letters += self._letters("orphan_action", self.held_keys.take(pa.array(index)),
                                     "found no impression within the window", _pick(self.held_refs, index))
            keep = np.flatnonzero(~orphans)
            self.held_keys = self.held_keys.take(pa.array(keep))
            self.held_types, self.held_times = self.held_types[keep], self.held_times[keep]
            self.held_refs = _pick(self.held_refs, keep)
        # Seen actions matter while their impression may still be open or a tombstone: 3 windows back.
        stale = self.seen_times + 3 * window < watermark_ms
        if stale.any():
            keep = np.flatnonzero(~stale)
            self.seen, self.seen_times = self.seen.take(pa.array(keep)), self.seen_times[keep]
        return joined, letters

    def next_due(self) -> int | None:
        """The watermark (ms) at which ``advance`` next has something to do; None when idle."""
        window = self.config.window_ms
        candidates = [times.min() + extra for times, extra in ((self.open.times, window + 1),
                                                                (self.tomb_times, 2 * window + 1),
                                                                (self.held_times, window + 1)) if len(times)]
        return int(min(candidates)) if candidates else None

    def advance(self, watermark_ms: int) -> tuple[ClosedImpressions, list[DeadLetter]]:
        """Close windows, free tombstones and report orphans up to ``watermark_ms``."""
        return self._advance(watermark_ms, [])

    def flush(self) -> tuple[ClosedImpressions, list[DeadLetter]]:
        return self._advance(END_OF_TIME_MS, [])


def _records(refs) -> list:
    """Action references as the records dead letters show: an Arrow table's rows as dicts."""
    return refs.to_pylist() if isinstance(refs, pa.Table) else list(refs)


def _pick(refs, index: np.ndarray):
    """Action references at ``index``: rows of an Arrow table, or items of a list."""
    if isinstance(refs, pa.Table):
        return refs.take(pa.array(index, pa.int64()))
    return [refs[i] for i in index]


def _append(held, refs):
    """Held action references followed by a batch's (both tables, or both lists; [] = none yet)."""
    if isinstance(refs, pa.Table):
        if isinstance(held, pa.Table) and held.num_rows:
            return pa.concat_tables([held, refs], promote_options="default")
        return refs
    return list(held) + list(refs)


def _repeats(keys: pa.Array, earlier: pa.Array) -> np.ndarray:
    """True where a key is in ``earlier`` or repeats one before it in ``keys``."""
    seen_before = (pc.is_in(keys, value_set=earlier).to_numpy(zero_copy_only=False) if len(earlier)
                   else np.zeros(len(keys), bool))
    _, first_index = np.unique(pc.index_in(keys, value_set=pc.unique(keys)).to_numpy(), return_index=True)
    is_first = np.zeros(len(keys), bool)
    is_first[first_index] = True
    return seen_before | ~is_first


def _positions(keys: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Index of each key in ``value_set`` (-1 where absent)."""
    if len(keys) == 0 or len(value_set) == 0:
        return np.full(len(keys), -1, np.int64)
    return pc.fill_null(pc.index_in(keys, value_set=value_set), -1).to_numpy().astype(np.int64)


def split_by_shard(table: pa.Table, shards: int) -> dict[int, pa.Table]:
    """The rows of ``table`` per join-key shard: ``fnv1a64(request_id \x1f item_id) % shards``."""
    if table.num_rows == 0:
        return {}
    keys = join_keys(table.column("request_id"), table.column("item_id"))
    shard_of_row = key_shards(keys, shards)
    return {shard: table.filter(pa.array(shard_of_row == shard)) for shard in np.unique(shard_of_row).tolist()}


def split_batch_by_shard(impressions: pa.Table, actions: pa.Table,
                         shards: int) -> list[tuple[int, pa.Table, pa.Table]]:
    """A micro-batch -> (shard, its impressions, its actions) for each join-key shard it touches,
    in shard order (a shard without rows of one kind gets that kind's empty table)."""
    impression_parts, action_parts = split_by_shard(impressions, shards), split_by_shard(actions, shards)
    return [(shard, impression_parts.get(shard, impressions.schema.empty_table()),
             action_parts.get(shard, actions.schema.empty_table()))
            for shard in sorted(impression_parts.keys() | action_parts.keys())]


def join_tables(config: JoinConfig, impressions: pa.Table, actions: pa.Table,
                batch_rows: int = 32_768) -> Iterator[tuple[ClosedImpressions, list[DeadLetter]]]:
    """Join two bounded tables in event-time micro-batches of ``batch_rows`` impressions.

    ``ClosedImpressions.refs`` are row numbers of the *time-sorted* ``impressions`` (the first
    thing yielded is that sorted table, so callers can take rows from it). After each micro-batch
    the watermark moves to the next impression's time; at the end it goes to +infinity.
    """
    joiner = BatchJoiner(config)
    impressions = impressions.sort_by("event_time_ms")
    actions = actions.sort_by("event_time_ms")
    yield impressions
    impression_keys = join_keys(impressions.column("request_id"), impressions.column("item_id")).combine_chunks() \
        if impressions.num_rows else _EMPTY_KEYS
    impression_times = impressions.column("event_time_ms").to_numpy()
    action_keys = join_keys(actions.column("request_id"), actions.column("item_id")).combine_chunks() \
        if actions.num_rows else _EMPTY_KEYS
    action_times = actions.column("event_time_ms").to_numpy()
    action_types = actions.column("action_type").to_pylist()
    action_start = 0
    for start in range(0, len(impression_times), batch_rows):
        end = min(start + batch_rows, len(impression_times))
        watermark = int(impression_times[end]) if end < len(impression_times) else int(impression_times[-1])
        action_end = int(np.searchsorted(action_times, watermark, side="left"))
        yield joiner.add(impression_keys.slice(start, end - start), impression_times[start:end],
                         np.arange(start, end), action_keys.slice(action_start, action_end - action_start),
                         action_types[action_start:action_end], action_times[action_start:action_end],
                         actions.slice(action_start, action_end - action_start), watermark)
        action_start = action_end
    rest = action_keys.slice(action_start)
    yield joiner.add(rest[:0], np.zeros(0, np.int64), np.zeros(0, np.int64), rest, action_types[action_start:],
                     action_times[action_start:], actions.slice(action_start),
                     int(impression_times[-1]) if len(impression_times) else 0)
    yield joiner.flush()
