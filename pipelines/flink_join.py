"""The join job on PyFlink (DataStream API): event logs -> join -> sampling -> features -> Examples.

The same pure logic as the Beam job (``transforms.batch_join``, ``transforms.examples``), and the
same shape as Beam's ``StreamingJoin``, because per-record Python state access is what limits
PyFlink here (~0.6k records/s in process mode): records are **micro-batches** (a few thousand
events each), never single events - in a replay only references to spilled Arrow files, live the
Arrow tables themselves.

* source: a ``FileSource`` over the replay's batch list, in event-time order: one line per
  micro-batch and join-key shard (``fnv1a64(request_id, item_id) % S``): its first event time,
  its shard and the paths of its spilled Arrow IPC files (the replay splits the batches, so only
  paths cross between the JVM and the Python workers, and each shard reads its own rows,
  memory-mapped); the source's read position is checkpointed. Each record is stamped with its
  batch's first event time; watermarks are monotonous, so a batch's arrival says nothing earlier
  follows. Live (``--watch``): a continuously monitored ``FileSource`` over announcement lines
  naming new log files (``pipelines.log_announcer``), stamped with the wall clock;
  ``ReadAnnouncedLogs`` reads each announced file (bad records to dead letters) and splits it
  into shard records that carry the tables themselves (Arrow IPC);
* ``key_by(shard)`` -> ``JoinShard`` (KeyedProcessFunction) around the engine-free
  ``transforms.shard_join.ShardJoin`` (the Beam job's DoFn wires the same): its state and its
  open impressions' references (paths, or live their IPC bytes) in keyed state (freed as windows
  close), one event-time timer at the next due time rounded up to ``emit_every_ms`` (at least the
  join window); on a timer the impressions whose window the watermark has passed become Examples
  (sampling + features) - one Example table per record, staged as a Parquet file whose path is
  the record (``stage_examples``) - and dead letters leave on a side output. In a replay the
  records of a shard arrive in event-time order, so the join also closes what is due when a
  record arrives (``in_order``: PyFlink holds watermarks back until an upstream bundle ends);
* sinks: ``FileSink``s (exactly once: part files are committed when a checkpoint completes) for
  the staged Examples' paths and the dead letters; when the job ends the runner publishes the
  staged files that a committed line names into ``examples/`` (a killed attempt's others go).

State backend, checkpoint directory and parallelism come from the runner (``runners.flink_runner``).
"""
from __future__ import annotations

from pathlib import Path

from pyflink.common import Types
from pyflink.datastream import KeyedProcessFunction, RuntimeContext
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor

from pipelines.busy_clock import BusyClock
from pipelines.flink_records import dead_letter_records, shard_records
from pipelines.tables import load_table, stage_examples
from schemas.spec_types import FeatureSpec
from transforms.shard_join import ShardJoin


class ReadAnnouncedLogs(KeyedProcessFunction):
    """Live input: announcement lines (``pipelines.log_announcer``) -> the announced log files read
    (bad records to dead letters) and split into shard records, as the replay does.

    One key (the announcements are few; each names a whole file). Keyed state counts the lines
    read; once the END line has come and every line before it was read - in whatever order the
    source's splits came - ``ended_marker`` is written: the runner then drains the job. Heartbeat
    lines yield nothing: they only move the watermark."""

    def __init__(self, spec: FeatureSpec, shards: int, ended_marker: str, timing_dir: str | None = None):
        self.spec, self.shards, self.ended_marker, self.timing_dir = spec, shards, ended_marker, timing_dir

    def open(self, runtime_context: RuntimeContext):
        from schemas.events import load_schema

        self.schemas = {"impressions": load_schema(self.spec.events.impression),
                        "actions": load_schema(self.spec.events.action)}
        self.read = runtime_context.get_state(ValueStateDescriptor("lines_read", Types.LONG()))
        self.end = runtime_context.get_state(ValueStateDescriptor("lines_before_end", Types.LONG()))
        self.clock = BusyClock("split", self.timing_dir)

    def close(self):
        self.clock.write()

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        from pipelines.log_announcer import END, parse_announcement
        from schemas.dead_letters import DeadLetterSink
        from schemas.logs import read_event_file

        with self.clock:
            _, kind, path = parse_announcement(value)
            out: list = []
            if kind == END:
                self.end.update(int(path))
            else:
                self.read.update((self.read.value() or 0) + 1)
                if kind:
                    sink = DeadLetterSink(keep=None)
                    impressions, actions = read_event_file(path, kind, self.schemas, sink,
                                                                   self.spec.events.time_range_ms)
                    out = dead_letter_records(sink.letters) + shard_records(impressions, actions, self.shards)
            if self.end.value() is not None and (self.read.value() or 0) >= self.end.value():
                Path(self.ended_marker).write_text(str(self.read.value()))
            return out


class JoinShard(KeyedProcessFunction):
    """Per join-key shard: ``transforms.shard_join.ShardJoin`` in keyed state (the ``ShardState``
    in one value; the open impressions' entries - paths, or live IPC bytes - in list state,
    appended to without a read-modify-write: PyFlink moves state between the JVM and the Python
    worker on every access), closed on event-time timers."""

    def __init__(self, spec: FeatureSpec, emit_every_ms: int | None, staging_dir: str, in_order: bool = False,
                 timing_dir: str | None = None):
        self.spec, self.emit_every_ms, self.staging_dir = spec, emit_every_ms, staging_dir
        self.in_order, self.timing_dir = in_order, timing_dir

    def open(self, runtime_context: RuntimeContext):
        self.state = runtime_context.get_state(ValueStateDescriptor("shard_join", Types.PICKLED_BYTE_ARRAY()))
        self.open_impressions = runtime_context.get_list_state(
            ListStateDescriptor("open_impressions", Types.PICKLED_BYTE_ARRAY()))
        self.join = ShardJoin(self.spec, self.emit_every_ms, load=load_table)
        self.clock = BusyClock("join", self.timing_dir)

    def close(self):
        self.clock.write()

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        with self.clock:
            _, impressions_ref, actions_ref = value
            state = self.state.value() or self.join.new_state()
            out = dead_letter_records(self.join.add(state, self.open_impressions, load_table(impressions_ref),
                                                    impressions_ref, load_table(actions_ref)))
            # In order (the replay): a record stamped T says every event before T has come, as the
            # watermark T - 1 will - but PyFlink holds watermarks back until the upstream Python
            # operator's bundle ends, and a replay's whole batch list can be one bundle: without
            # this the join would hold every impression open until the end. So close what is due.
            if self.in_order and state.timer_ms is not None and state.timer_ms < ctx.timestamp():
                ctx.timer_service().delete_event_time_timer(state.timer_ms)
                return out + self._close_to(state, ctx.timestamp() - 1, ctx)
            self._save(ctx, state)
            return out

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        # Close all the watermark has passed, not only what was due at this timer: a timer Python
        # registers while the JVM's watermark is already past it would fire only at the next
        # watermark, and its Examples would reach the trainer behind it.
        with self.clock:
            state = self.state.value()
            return [] if state is None else self._close_to(state, timestamp, ctx)

    def _close_to(self, state, watermark: int, ctx) -> list:
        state.timer_ms = None
        current = ctx.timer_service().current_watermark()
        watermark = max(watermark, current)
        table, letters = self.join.close_to(state, self.open_impressions, watermark)
        out = dead_letter_records(letters) + ([] if table is None else [stage_examples(table, self.staging_dir)])
        if state.idle:  # nothing open in this shard: free its state
            self.state.clear()
            self.open_impressions.clear()
        else:
            self._save(ctx, state)
        return out

    def _save(self, ctx, state) -> None:
        due = self.join.next_timer(state)
        if due is not None and (state.timer_ms is None or due < state.timer_ms):
            state.timer_ms = due
            ctx.timer_service().register_event_time_timer(due)
        self.state.update(state)
