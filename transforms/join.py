"""The streaming join: label each impression with the actions that follow it within a window.

Keyed by (request_id, item_id). All decisions are on event time, so the result does not depend
on arrival order (given a correct watermark), and batch replay equals streaming:

* an action joins its impression iff ``action_time - impression_time <= window`` (the edge,
  exactly ``window``, joins; an action stamped before its impression - clock skew - joins too);
* the impression's window closes when the watermark passes ``impression_time + window`` (a
  watermark ``w`` promises no more events *before* ``w``, so timers are set 1 ms past the end): the
  impression is emitted once with one label per action type (1 if such an action joined) and the
  time of the first joined action of each type; its state shrinks to a tombstone;
* an action later than the window -> dead letter ``late_action`` (also when it arrives after the
  window closed, caught by the tombstone, which is freed at ``impression_time + 2 * window``);
  one more than twice the window after its impression -> ``orphan_action``, in every mode;
* actions that arrive before their impression are held; with no impression by
  ``action_time + window`` they become ``orphan_action`` dead letters;
* a second impression for a key -> ``duplicate_impression``; the same action (type and time)
  twice -> ``duplicate_action``; neither is emitted twice. An action type outside the spec's
  labels -> ``unlabelled_action``.
* ``emit_positive_early``: the example is emitted as soon as the target action joins (with the
  labels known then; later actions of other types are not added), and not again at window end.

``KeyJoin`` is the per-key state machine that the Beam and Flink adapters drive; ``StreamJoiner``
drives many keys with a watermark for plain-Python use (tests, benchmarks).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable

from schemas.dead_letters import DeadLetter
from schemas.events import END_OF_TIME_MS


@dataclass(frozen=True)
class JoinConfig:
    window_ms: int
    label_actions: tuple[str, ...]
    target: str
    emit_positive_early: bool = False

    def __post_init__(self):
        if self.window_ms <= 0:
            raise ValueError(f"join window must be > 0 ms, got {self.window_ms}")
        if self.target not in self.label_actions:
            raise ValueError(f"target action {self.target!r} is not among the labels {self.label_actions}")

    @classmethod
    def from_spec(cls, spec) -> "JoinConfig":
        return cls(spec.join.window_ms, spec.labels.actions, spec.labels.target, spec.join.emit_positive_early)


@dataclass
class Joined:
    """An impression with its labels, ready for sampling and feature extraction."""

    impression: Any  # whatever the caller passed: a record dict or a row reference
    impression_time_ms: int
    labels: dict[str, int]
    label_times_ms: dict[str, int]


@dataclass
class KeyState:
    impression: Any = None
    impression_time_ms: int | None = None
    label_times_ms: dict[str, int] = field(default_factory=dict)
    held: list[tuple[str, int, Any]] = field(default_factory=list)  # actions before the impression
    seen_actions: set[tuple[str, int]] = field(default_factory=set)
    emitted: bool = False
    closed: bool = False

    @property
    def empty(self) -> bool:
        return self.impression_time_ms is None and not self.held


def _letter(reason: str, detail: str, record: Any) -> DeadLetter:
    return DeadLetter("join", reason, detail, record=repr(record) if record is not None else "")


class KeyJoin:
    """The join for one key. Methods return (outputs, state); outputs are Joined or DeadLetter."""

    def __init__(self, config: JoinConfig):
        self.config = config

    def _joined(self, state: KeyState) -> Joined:
        labels = {a: int(a in state.label_times_ms) for a in self.config.label_actions}
        return Joined(state.impression, state.impression_time_ms, labels, dict(state.label_times_ms))

    def _outside_window(self, state: KeyState, action_type: str, time_ms: int, record: Any) -> list:
        """Dead letter for an action after its impression's window; [] if it is inside."""
        delay = time_ms - state.impression_time_ms
        if delay > 2 * self.config.window_ms:
            # Streaming has freed the tombstone by then: call it an orphan in every mode.
            return [_letter("orphan_action", f"{action_type} at {time_ms} is {delay} ms after its impression, "
                            f"more than twice the {self.config.window_ms} ms window", record)]
        if delay > self.config.window_ms:
            return [_letter("late_action", f"{action_type} at {time_ms} is {delay} ms after its impression, "
                            f"over the {self.config.window_ms} ms window", record)]
        return []

    def _apply_action(self, state: KeyState, action_type: str, time_ms: int, record: Any) -> list:
        """An action meeting a present impression."""
        outside = self._outside_window(state, action_type, time_ms, record)
        if outside:
            return outside
        first = state.label_times_ms.get(action_type)
        state.label_times_ms[action_type] = time_ms if first is None else min(first, time_ms)
        if (self.config.emit_positive_early and action_type == self.config.target and not state.emitted
                and not state.closed):
            state.emitted = True
            return [self._joined(state)]
        return []

    def on_impression(self, state: KeyState, time_ms: int, record: Any) -> list:
        if state.impression_time_ms is not None:
            return [_letter("duplicate_impression", f"second impression for this key at {time_ms}", record)]
        state.impression, state.impression_time_ms = record, time_ms
        outputs = []
        held, state.held = state.held, []
        for action_type, action_time, action_record in held:
            outputs += self._apply_action(state, action_type, action_time, action_record)
        return outputs

    def on_action(self, state: KeyState, action_type: str, time_ms: int, record: Any) -> list:
        if action_type not in self.config.label_actions:
            return [_letter("unlabelled_action", f"action type {action_type!r} is not a label "
                            f"{list(self.config.label_actions)}", record)]
        if (action_type, time_ms) in state.seen_actions:
            return [_letter("duplicate_action", f"{action_type} at {time_ms} seen before", record)]
        state.seen_actions.add((action_type, time_ms))
        if state.closed:
            return self._outside_window(state, action_type, time_ms, record) or [_letter(
                "late_action", f"{action_type} at {time_ms} arrived after its impression's window closed", record)]
        if state.impression_time_ms is None:
            state.held.append((action_type, time_ms, record))
            return []
        return self._apply_action(state, action_type, time_ms, record)

    def next_timer(self, state: KeyState) -> int | None:
        """Event time at which ``on_timer`` must run next (None: the state can be dropped).

        One past the last instant that may still change the state: windows include their end.
        """
        window = self.config.window_ms
        if state.closed:
            return state.impression_time_ms + 2 * window + 1
        if state.impression_time_ms is not None:
            return state.impression_time_ms + window + 1
        if state.held:
            return min(t for _, t, _ in state.held) + window + 1
        return None

    def on_timer(self, state: KeyState, watermark_ms: int) -> tuple[list, bool]:
        """Fire what is due at ``watermark_ms``; returns (outputs, whether to drop the state)."""
        window = self.config.window_ms
        outputs: list = []
        if state.closed:
            return outputs, watermark_ms > state.impression_time_ms + 2 * window
        if state.impression_time_ms is not None:
            if watermark_ms > state.impression_time_ms + window:
                if not state.emitted:
                    outputs.append(self._joined(state))
                state.emitted, state.closed = True, True
                state.impression, state.held = None, []
            return outputs, False
        still_held = []
        for action_type, time_ms, record in state.held:
            if watermark_ms > time_ms + window:
                outputs.append(_letter("orphan_action", f"{action_type} at {time_ms} found no impression "
                                       f"within {window} ms", record))
            else:
                still_held.append((action_type, time_ms, record))
        state.held = still_held
        return outputs, not still_held


class StreamJoiner:
    """Many keys and a watermark, in plain Python: feed events, advance the watermark, collect outputs."""

    def __init__(self, config: JoinConfig):
        self.logic = KeyJoin(config)
        self.states: dict[Hashable, KeyState] = {}
        self.timers: list[tuple[int, Hashable]] = []  # (time, key) min-heap; stale entries are skipped
        self.scheduled: dict[Hashable, int] = {}  # key -> its live timer
        self.watermark_ms = -END_OF_TIME_MS

    def _reschedule(self, key: Hashable, state: KeyState) -> None:
        due = self.logic.next_timer(state)
        if due is not None and self.scheduled.get(key) != due:
            self.scheduled[key] = due
            heapq.heappush(self.timers, (due, key))

    def _state(self, key: Hashable) -> KeyState:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = KeyState()
        return state

    def impression(self, key: Hashable, time_ms: int, record: Any) -> list:
        state = self._state(key)
        outputs = self.logic.on_impression(state, time_ms, record)
        self._reschedule(key, state)
        return outputs

    def action(self, key: Hashable, action_type: str, time_ms: int, record: Any) -> list:
        state = self._state(key)
        outputs = self.logic.on_action(state, action_type, time_ms, record)
        self._reschedule(key, state)
        if state.empty and not state.closed and key not in self.scheduled:
            del self.states[key]  # e.g. an unlabelled action on a fresh key: nothing to keep
        return outputs

    def advance_watermark(self, watermark_ms: int) -> list:
        """Fire every timer due at or before ``watermark_ms``."""
        self.watermark_ms = max(self.watermark_ms, watermark_ms)
        outputs: list = []
        while self.timers and self.timers[0][0] <= self.watermark_ms:
            due, key = heapq.heappop(self.timers)
            if self.scheduled.get(key) != due:
                continue  # stale: the key was rescheduled since
            del self.scheduled[key]
            state = self.states[key]
            fired, drop = self.logic.on_timer(state, self.watermark_ms)
            outputs += fired
            if drop:
                del self.states[key]
            else:
                self._reschedule(key, state)
        return outputs

    def flush(self) -> list:
        """End of input: the watermark goes to +infinity."""
        return self.advance_watermark(END_OF_TIME_MS)

    @property
    def live_keys(self) -> int:
        return len(self.states)


def run_join(config: JoinConfig, events: Iterable[tuple[str, Hashable, str | None, int, Any]],
             watermark_lag_ms: int = 0) -> list:
    """Join a time-ordered stream of ("impression" | "action", key, action_type, time_ms, record).

    The watermark trails the newest event time by ``watermark_lag_ms``; returns all outputs.
    """
    joiner = StreamJoiner(config)
    outputs: list = []
    newest = -END_OF_TIME_MS
    for kind, key, action_type, time_ms, record in events:
        if kind == "impression":
            outputs += joiner.impression(key, time_ms, record)
        else:
            outputs += joiner.action(key, action_type, time_ms, record)
        if time_ms > newest:
            newest = time_ms
            outputs += joiner.advance_watermark(newest - watermark_lag_ms)  # nothing earlier will come
    return outputs + joiner.flush()


def join_key_events(config: JoinConfig, events: list[tuple[str, str | None, int, Any]]) -> list:
    """Batch join of one key's events ("impression" | "action", action_type, time_ms, record).

    Events are applied in event-time order (impressions first among equal times), then the
    watermark goes to +infinity: the same decisions a streaming run makes, from a GroupByKey.
    """
    logic = KeyJoin(config)
    state = KeyState()
    outputs: list = []
    for kind, action_type, time_ms, record in sorted(events, key=lambda e: (e[2], e[0] != "impression")):
        if kind == "impression":
            outputs += logic.on_impression(state, time_ms, record)
        else:
            outputs += logic.on_action(state, action_type, time_ms, record)
    while logic.next_timer(state) is not None:
        fired, drop = logic.on_timer(state, END_OF_TIME_MS)
        outputs += fired
        if drop:
            break
    return outputs
