"""The streaming join of one join-key shard, engine-free: what the Beam DoFn and the Flink
function each wire to their state and timers.

A shard's state is typed (``ShardState``): the columnar ``BatchJoiner`` (open keys, times, held
actions), the next impression reference number and the event-time timer set. The open
impressions' rows are kept apart, in an ``OpenImpressions`` store the engine chooses (Flink: list
state, appended to without rewriting the rest; Beam: a list inside its one state value). Each
entry is ``(first ref, rows, table ref)``: the table as it came (a path, IPC bytes or the table
itself; ``load`` reads it), its rows numbered ``first .. first + rows - 1``; an entry goes once
every one of its rows has closed.

Rules:

* ``add``: a micro-batch's impressions get the next refs and an entry; impressions and actions go
  into the joiner (the watermark does not move);
* ``close_to(watermark)``: the joiner advances; the closed impressions become Examples (sampling
  and features) and the entries with no open row left go;
* ``next_timer``: the joiner's next due time rounded up to a whole ``granularity`` (the join
  window, or the emission interval if longer): ``-(-due // step) * step``. Rounding bounds the
  firings by (event-time span / granularity) and only delays emission - decisions are on event
  time, so the output is the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import pyarrow as pa

from schemas.dead_letters import DeadLetter
from schemas.spec_types import FeatureSpec
from transforms.batch_join import BatchJoiner
from transforms.examples import ExampleBuilder
from transforms.join import JoinConfig

Entry = tuple[int, int, Any]  # (first ref, rows, table ref)


class OpenImpressions(Protocol):
    """Where a shard keeps its open impressions' entries."""

    def add(self, entry: Entry) -> None: ...

    def get(self) -> list[Entry]: ...

    def update(self, entries: list[Entry]) -> None: ...

    def clear(self) -> None: ...


@dataclass
class EntryList:
    """``OpenImpressions`` in memory (kept inside an engine's state value)."""

    entries: list[Entry] = field(default_factory=list)

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)

    def get(self) -> list[Entry]:
        return list(self.entries)

    def update(self, entries: list[Entry]) -> None:
        self.entries = list(entries)

    def clear(self) -> None:
        self.entries = []


@dataclass
class ShardState:
    joiner: BatchJoiner
    next_ref: int = 0  # the ref the next impression gets
    timer_ms: int | None = None  # the event-time timer set, if any (for engines that track it)

    @property
    def idle(self) -> bool:
        """Nothing open, held or remembered: the shard's state can be freed."""
        return self.joiner.next_due() is None


class ShardJoin:
    """The per-shard join of ``spec``; ``load(ref)`` reads a table ref of an entry."""

    def __init__(self, spec: FeatureSpec, emit_every_ms: int | None, load: Callable[[Any], pa.Table]):
        self.config = JoinConfig.from_spec(spec)
        self.builder = ExampleBuilder(spec)
        self.granularity = max(self.config.window_ms, emit_every_ms or 0)
        self.load = load

    def new_state(self) -> ShardState:
        return ShardState(BatchJoiner(self.config))

    def add(self, state: ShardState, open_impressions: OpenImpressions, impressions: pa.Table, impressions_ref: Any,
            actions: pa.Table) -> list[DeadLetter]:
        """One micro-batch of the shard (``impressions_ref``: how ``load`` finds ``impressions``
        again); returns its dead letters. The watermark does not move."""
        first = state.next_ref
        state.next_ref += impressions.num_rows
        if impressions.num_rows:
            open_impressions.add((first, impressions.num_rows, impressions_ref))
        refs = np.arange(first, first + impressions.num_rows)
        _, letters = state.joiner.add_tables(impressions, refs, actions)
        return letters

    def close_to(self, state: ShardState, open_impressions: OpenImpressions,
                 watermark_ms: int) -> tuple[pa.Table | None, list[DeadLetter]]:
        """Advance to ``watermark_ms``: the Examples of the impressions closed (None if none)
        and the dead letters (join, then features)."""
        closed, letters = state.joiner.advance(watermark_ms)
        if not len(closed):
            return None, letters
        entries = open_impressions.get()
        pending = pa.concat_tables([self.load(ref).append_column("_ref", pa.array(np.arange(first, first + rows)))
                                    for first, rows, ref in entries])
        table, feature_letters, _ = self.builder.build_pending(pending, closed)
        # keep the entries with a row still open in the joiner - a ref in [first, first + rows)
        # (closed rows, and rows the joiner refused as duplicates, are never asked for again)
        open_refs = np.sort(state.joiner.open.refs)
        firsts = np.array([first for first, _, _ in entries])
        ends = firsts + np.array([rows for _, rows, _ in entries])
        still_open = np.searchsorted(open_refs, ends) > np.searchsorted(open_refs, firsts)
        if not still_open.all():
            open_impressions.update([entry for entry, keep in zip(entries, still_open) if keep])
        return (table if table.num_rows else None), letters + feature_letters

    def next_timer(self, state: ShardState) -> int | None:
        """When the shard next has something to close, rounded up to ``granularity`` (ms)."""
        due = state.joiner.next_due()
        return None if due is None else -(-due // self.granularity) * self.granularity
