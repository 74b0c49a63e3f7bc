"""The online trainer as a PyFlink operator after the join: Example tables in, metric rows out.

``TrainStream`` (a KeyedProcessFunction on one key: one model, as one Monolith training worker)
holds the Example tables in keyed state until the watermark passes them, then trains them in the
trainer's total order (impression time, request id, item id) in batches of
``training.batch_size`` (``trainer.running.RunningTrainer``, the same code the Beam job runs);
fewer than a batch's examples wait for the next timer, and the end of the input (the final
watermark fires the timer at ``END``) trains the rest, closes the metric windows and emits the
summary. Python workers run in process mode: torch hangs in thread mode.

Recovery: the model lives in the worker's memory and is recovered from the model directory's
newest snapshot, while Flink's checkpoint recovers the examples: the tables trained since the
last snapshot stay in keyed state (``trained``, appended to, cleared when a snapshot is
published), so after a restore the trainer resumes from its newest snapshot and re-trains
exactly what follows it - the restored ``trained`` tables, then the waiting and replayed ones.
Without a model directory there is nothing to resume from and nothing is kept.

Several workers (``training.workers`` = K > 1): every Example table reaches all K subtasks (one
copy per subtask, keyed by ``flink_records.subtask_keys``), and subtask ``r`` is worker ``r`` of
a ``trainer.sharded`` trainer whose process group meets in a file under ``rendezvous_dir`` (one
per restart attempt). All K take the same timers and train the same global batches in lockstep;
subtask 0 emits the metric rows.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pyarrow as pa
import pyarrow.compute as pc
from pyflink.common import Types
from pyflink.datastream import KeyedProcessFunction, RuntimeContext
from pyflink.datastream.state import ListStateDescriptor

from pipelines.busy_clock import BusyClock
from pipelines.flink_records import FINAL_WATERMARK as END
from pipelines.flink_records import subtask_keys
from schemas.spec_types import FeatureSpec
from trainer.running import ORDER, PublishOptions, after_position, log

COLLECTIVE_TIMEOUT_S = 300  # a collective waits at most this long for a lost or missing peer


class TrainStream(KeyedProcessFunction):
    """Example tables (the join's staged Parquet paths, keyed to one trainer) -> JSON metric rows;
    the summary row last (``"final": true``). Tables wait (and trained ones are kept) in keyed
    state as references (``flink_join.load_table``): the staged paths, or the Arrow IPC bytes of
    the part of a table that still waits.

    An example is ready when no earlier one can still come: the join closes an impression of
    time t at its first timer at or after t + window (timers are rounded up to ``emit_every_ms``),
    before it passes that watermark on, so once the watermark is past T every example with
    impression time <= T - lag has arrived, ``lag = window + max(window, emit_every_ms)``. (At
    the final watermark the join closes everything at once; readiness by impression time keeps
    the trainer's order even then.)"""

    def __init__(self, spec: FeatureSpec, emit_every_ms: int, device: str, progress: bool,
                 publishing: PublishOptions | None, timing_dir: str | None = None, rendezvous_dir: str | None = None):
        self.spec, self.device, self.progress, self.publishing = spec, device, progress, publishing
        self.timing_dir, self.rendezvous_dir = timing_dir, rendezvous_dir
        self.lag_ms = spec.join.window_ms + max(spec.join.window_ms, emit_every_ms or 0)

    def open(self, runtime_context: RuntimeContext):
        from trainer.running import RunningTrainer

        self.waiting = runtime_context.get_list_state(ListStateDescriptor("waiting", Types.PICKLED_BYTE_ARRAY()))
        self.trained = runtime_context.get_list_state(ListStateDescriptor("trained", Types.PICKLED_BYTE_ARRAY()))
        publishing = _after_restart(self.publishing, runtime_context.get_attempt_number())
        resume = publishing is not None and publishing.resume
        self.rank, self.workers = runtime_context.get_index_of_this_subtask(), self.spec.training.workers
        if self.rendezvous_dir is not None:  # (who is which worker: for operators and the kill test)
            os.makedirs(self.rendezvous_dir, exist_ok=True)
            with open(os.path.join(self.rendezvous_dir, f"trainer-{self.rank}.pid"), "w") as out:
                out.write(str(os.getpid()))
        if runtime_context.get_number_of_parallel_subtasks() != self.workers:
            raise RuntimeError(f"the trainer runs {runtime_context.get_number_of_parallel_subtasks()} subtasks "
                               f"for {self.workers} workers")
        self.key = subtask_keys(self.workers, runtime_context.get_max_number_of_parallel_subtasks())[self.rank]
        collectives = None
        if self.workers > 1:
            collectives = _join_workers(self.rendezvous_dir, runtime_context.get_attempt_number(), self.rank,
                                        self.workers)
        self.running = RunningTrainer(self.spec, self.device, self.progress and self.rank == 0, publishing,
                                      collectives)
        # first firing after a restore: re-train the kept tables (all of them when no snapshot had been published)
        self.replay_trained = resume or (publishing is not None and runtime_context.get_attempt_number() > 0)
        self.keep = self.publishing is not None
        self.timers: set[int] = set()
        self.clock = BusyClock("train", self.timing_dir)

    def close(self):
        self.clock.write()

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        import pyarrow.parquet as pq

        key, value = value
        if key != self.key:
            raise RuntimeError(f"trainer subtask {self.rank} got the copy keyed {key}, not {self.key}: the key-group "
                               f"assignment differs from flink_records.subtask_of_key")
        self.waiting.add(value)
        # its examples are ready once the watermark is past the newest of them + lag (the join
        # may close them later than their own timer: it closes up to its watermark)
        newest = pc.max(pq.read_table(value, columns=["impression_time_ms"]).column(0)).as_py()
        ready = ctx.timestamp() if newest is None else max(ctx.timestamp(), newest + self.lag_ms)
        for due in (ready, END):
            if due not in self.timers:
                ctx.timer_service().register_event_time_timer(due)
                self.timers.add(due)
        return []

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        with self.clock:
            return self._train(timestamp)

    def _train(self, timestamp: int) -> list[str]:
        from pipelines.tables import ipc_bytes, load_table

        self.timers.discard(timestamp)
        flush = timestamp == END
        tables = [load_table(ref) for ref in (self.waiting.get() or [])]
        if self.replay_trained:  # they are trained (or skipped) again below, and kept again
            tables = [load_table(ref) for ref in (self.trained.get() or [])] + tables
            self.trained.clear()
            self.replay_trained = False
        examples = pa.concat_tables(tables) if tables else None
        if examples is not None and not flush:
            is_ready = pc.less_equal(examples.column("impression_time_ms"), timestamp - self.lag_ms)
            examples, waiting = examples.filter(is_ready), examples.filter(pc.invert(is_ready))
        else:
            waiting = None
        if examples is not None and examples.num_rows:
            rest, rows = self.running.train([examples], flush=flush)
        elif flush:
            rest, rows = None, self.running.trainer.closed_windows(flush=True)
        else:
            return []
        kept = [] if waiting is None else [waiting]
        if rest is not None and rest.num_rows:
            kept.append(rest)
        self.waiting.update([ipc_bytes(table) for table in kept if table.num_rows])
        if self.keep and examples is not None and examples.num_rows:
            # keep what was trained after the newest snapshot (train() sorts into the trainer's order)
            used = examples.num_rows - (rest.num_rows if rest is not None else 0)
            trained = examples.sort_by(ORDER).slice(0, used)
            if self.running.snapshot_taken:
                self.trained.clear()
                trained = after_position(trained, self.running.snapshot_position)
            if trained.num_rows:
                self.trained.add(ipc_bytes(trained))
        out = [json.dumps(row) for row in rows]
        if flush:
            self.running.finish()
            self.trained.clear()
            summary = self.running.summary()
            log(f"trained {summary['examples']} examples: {summary}")
            out.append(json.dumps({**summary, "final": True}))
            self.running.close()
        return out if self.rank == 0 else []  # (every worker holds the same metrics)


def _join_workers(rendezvous_dir: str, attempt: int, rank: int, workers: int):
    """This subtask's place in the trainer's process group (gloo), met in a file of
    ``rendezvous_dir`` per restart attempt; a peer that does not come or is lost fails the step
    after ``COLLECTIVE_TIMEOUT_S`` (and Flink restarts the job from its checkpoint)."""
    import datetime
    from pathlib import Path

    import torch.distributed as dist

    from trainer.sharded import Collectives

    path = Path(rendezvous_dir) / f"attempt-{attempt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", init_method=path.resolve().as_uri(), rank=rank, world_size=workers,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return Collectives()



def _after_restart(publishing: PublishOptions | None, attempt: int) -> PublishOptions | None:
    """Flink restarted the job (``attempt`` > 0, e.g. after a worker process died): the model
    lives in the worker's memory, so it resumes from the newest snapshot in the model directory,
    as ``--resume`` does (the checkpoint restores the tables trained after it)."""
    if publishing is None or publishing.resume or attempt == 0:
        return publishing
    from trainer.publish import newest_snapshot, read_manifest

    if newest_snapshot(read_manifest(publishing.model_dir)) is None:
        return publishing  # (nothing published yet: the kept tables are all there is; train them afresh)
    return dataclasses.replace(publishing, resume=True)
