"""The record-level Beam join, kept as the reference the columnar joins are tested against.

``JoinSampleExtract`` for any PCollection of ("impression" | "action", record):
``JoinImpressionsWithActions``, a stateful DoFn keyed by (request_id, item_id) that drives the
per-key state machine ``transforms.join.KeyJoin`` with one event-time timer per key, then
``ToExamples`` (batches -> ``ExampleBuilder.build``). No command runs it: ``tests/test_join.py``
holds the columnar join to ``KeyJoin``'s decisions, and ``tests/test_beam_join.py`` runs this DoFn
on hand-driven watermarks.
"""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from pipelines.beam_io import DEAD, dead_letter_outputs
from schemas.dead_letters import DeadLetter
from schemas.spec_types import FeatureSpec
from transforms.examples import ExampleBuilder
from transforms.join import JoinConfig, Joined, KeyJoin, KeyState
from transforms.keys import join_key


def event_key(record: dict) -> str:
    """The join key: request id and item id (a string, so any runner can encode it)."""
    return join_key(record["request_id"], record["item_id"])


class JoinDoFn(beam.DoFn):
    """Per (request_id, item_id): the KeyJoin state machine with one event-time timer."""

    STATE = ReadModifyWriteStateSpec("join_state", PickleCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)

    def __init__(self, config: JoinConfig):
        self.config = config

    def setup(self):
        self.logic = KeyJoin(self.config)

    def _emit(self, outputs: Iterable):
        outputs = list(outputs)
        yield from (o for o in outputs if not isinstance(o, DeadLetter))
        yield from dead_letter_outputs(o for o in outputs if isinstance(o, DeadLetter))

    def _store(self, state_cell, timer, state: KeyState | None):
        due = self.logic.next_timer(state) if state is not None else None
        if due is None:
            state_cell.clear()
            timer.clear()
        else:
            state_cell.write(state)
            timer.set(Timestamp(micros=due * 1000))

    def process(self, element, state_cell=beam.DoFn.StateParam(STATE), timer=beam.DoFn.TimerParam(CLOSE)):
        _, (kind, record) = element
        state = state_cell.read() or KeyState()
        if kind == "impression":
            outputs = self.logic.on_impression(state, record["event_time_ms"], record)
        else:
            outputs = self.logic.on_action(state, record["action_type"], record["event_time_ms"], record)
        self._store(state_cell, timer, None if state.empty and not state.closed else state)
        yield from self._emit(outputs)

    @on_timer(CLOSE)
    def close(self, fired_at=beam.DoFn.TimestampParam, state_cell=beam.DoFn.StateParam(STATE),
              timer=beam.DoFn.TimerParam(CLOSE)):
        state = state_cell.read()
        if state is None:
            return
        outputs, drop = self.logic.on_timer(state, fired_at.micros // 1000)
        self._store(state_cell, timer, None if drop else state)
        yield from self._emit(outputs)


class JoinImpressionsWithActions(beam.PTransform):
    """("impression" | "action", record) -> Joined, with dead letters on the side (streaming:
    a stateful DoFn per (request_id, item_id) with an event-time timer)."""

    def __init__(self, config: JoinConfig):
        super().__init__()
        self.config = config

    def expand(self, events):
        keyed = events | "KeyByRequestAndItem" >> beam.Map(lambda event: (event_key(event[1]), event)).with_output_types(
            beam.typehints.Tuple[str, beam.typehints.Any])
        joined = keyed | "Join" >> beam.ParDo(JoinDoFn(self.config)).with_outputs(DEAD, main="joined")
        return {"joined": joined.joined, DEAD: joined[DEAD]}


class BuildExamples(beam.DoFn):
    """A batch of Joined -> Example records (dicts in the Example schema) and feature dead letters."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec

    def setup(self):
        self.builder = ExampleBuilder(self.spec)

    def process(self, batch: list[Joined]):
        table, letters = self.builder.build(batch)
        yield from dead_letter_outputs(letters)
        yield from table.to_pylist()


class ToExamples(beam.PTransform):
    def __init__(self, spec: FeatureSpec, max_batch_size: int = 4096):
        super().__init__()
        self.spec, self.max_batch_size = spec, max_batch_size

    def expand(self, joined):
        examples = (joined
                    | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.max_batch_size)
                    | "SampleAndExtract" >> beam.ParDo(BuildExamples(self.spec)).with_outputs(DEAD, main="examples"))
        return {"examples": examples.examples, DEAD: examples[DEAD]}


class JoinSampleExtract(beam.PTransform):
    """The whole first half of the streaming job: events -> Examples, all dead letters merged."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.spec = spec

    def expand(self, events):
        joined = events | "JoinImpressionsWithActions" >> JoinImpressionsWithActions(JoinConfig.from_spec(self.spec))
        examples = joined["joined"] | "ToExamples" >> ToExamples(self.spec)
        dead = (joined[DEAD], examples[DEAD]) | "MergeDeadLetters" >> beam.Flatten()
        return {"examples": examples["examples"], DEAD: dead}
