"""The options of one job (``streamrec join`` / ``run``), typed: what the CLI parsed, what both
runners read, and what cluster submission forwards.

A job runs in one of four modes: backfill (bounded logs in bulk), replay (the logs in event-time
order through the streaming job), live (new log files as they arrive, until stopped) or kafka
(impressions and actions from Kafka topics, ``--source``: to the end offsets it names, or live).
``JobOptions.to_argv`` is the command line that parses back to the same options; submission to
a Flink cluster runs exactly that, so no option is left behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class Mode(str, Enum):
    BACKFILL = "backfill"  # bounded logs in bulk, the same decisions as streaming
    REPLAY = "replay"  # the logs in event-time order through the streaming job
    LIVE = "live"  # new files of the log directory as they arrive (``watch_interval_s``)
    KAFKA = "kafka"  # Kafka topics (``source``), bounded by its ``until`` or live until stopped


@dataclass(frozen=True)
class JobOptions:
    out: Path
    logs: Path | None = None  # None: ``run`` obtains MovieLens-100K into OUT/logs
    spec: str | None = None  # a built-in name or a YAML path (None: movielens)
    train: bool = False  # ``run`` (join and train) rather than ``join``
    mode: Mode = Mode.BACKFILL
    watch_interval_s: float | None = None  # live: seconds between looks at the log directory
    stop_after_s: float | None = None  # live: stop after this long (None: until SIGTERM)
    runner: str = "beam"  # "beam" (DirectRunner) or "flink"
    flink_master: str | None = None  # HOST:PORT of a standalone cluster's REST endpoint
    checkpoint_every_s: float = 10.0  # Flink checkpoint interval
    parallelism: int | None = None  # Flink operator parallelism (None: the runner's default)
    events_per_step: int = 16_384  # Flink replay: events per micro-batch
    resume: bool = False  # Flink: from the newest checkpoint; with model_dir: its newest snapshot
    device: str = "cpu"  # where tables and model live
    progress: bool = True  # a progress bar on stderr
    model_dir: Path | None = None  # publish snapshots and deltas here
    store: str | None = None  # redis:// URI of the row store (overrides the spec's)
    trainers: int | None = None  # Flink: trainer workers of one model (overrides training.workers)
    source: str | None = None  # kafka://... : read Kafka topics, not logs (``runners.kafka_source``)
    kafka_jars: str | None = None  # comma-separated connector jars (None: STREAMREC_KAFKA_JARS or make's)
    backfill_until_ms: int | None = None  # run: batch-train the Examples before this time first (ms since epoch)
    backfill_epochs: int = 2  # passes over that history
    backfill_scale: int = 16  # its batch: this x the spec's training.batch_size (CowClip's scaling rule)

    def __post_init__(self):
        if (self.mode is Mode.LIVE) != (self.watch_interval_s is not None):
            raise ValueError("live mode and a watch interval go together (--watch SECONDS)")
        if (self.mode is Mode.KAFKA) != (self.source is not None):
            raise ValueError("the kafka mode and a --source go together")
        if self.source is not None and self.runner != "flink":
            raise ValueError("--source kafka://... reads Kafka through Flink's connector: it needs --runner flink")
        if self.source is not None and self.logs is not None:
            raise ValueError("--source reads Kafka topics: give it or --logs, not both")
        if self.stop_after_s is not None and self.mode not in (Mode.LIVE, Mode.KAFKA):
            raise ValueError("--stop-after needs --watch or --source (it ends a live job)")
        if self.backfill_until_ms is not None:
            if self.resume:
                raise ValueError("--backfill-until starts a new model: not with --resume (which continues one)")
            if self.source is not None:
                raise ValueError("--backfill-until trains on the history in --logs: not with --source")
            self.backfill  # noqa: B018 (bad epochs or scale raise, naming the flag)
        elif (self.backfill_epochs, self.backfill_scale) != (2, 16):
            raise ValueError("--backfill-epochs and --backfill-scale are settings of --backfill-until TIME")
        if self.trainers is not None and not 1 <= self.trainers <= 256:
            raise ValueError(f"--trainers must be in [1, 256], got {self.trainers}")

    @property
    def live(self) -> bool:
        return self.mode is Mode.LIVE

    @functools.cached_property
    def kafka(self):
        """The Kafka source's settings (``runners.kafka_source.KafkaSourceConfig``), or None:
        parsed once (the parse reads ``until``'s end-offsets file)."""
        if self.source is None:
            return None
        from runners.kafka_source import KafkaSourceConfig

        return KafkaSourceConfig.from_uri(self.source)

    @property
    def backfill(self):
        """Phase 1's settings (``trainer.backfill.BackfillOptions``), or None."""
        if self.backfill_until_ms is None:
            return None
        from trainer.backfill import BackfillOptions

        return BackfillOptions(self.backfill_until_ms, self.backfill_epochs, self.backfill_scale)

    @property
    def runs_until_stopped(self) -> bool:
        """Live logs, or an unbounded Kafka source: the job ends when it is stopped (draining)."""
        return self.live or (self.source is not None and not self.kafka.bounded)

    @property
    def streaming(self) -> bool:
        """Replay or live: the streaming job, whose watermark closes windows as it goes."""
        return self.mode is not Mode.BACKFILL

    @property
    def on_cluster(self) -> bool:
        """Submitted through ``flink run`` to the cluster of ``--flink-master``, not run here."""
        return self.runner == "flink" and bool(self.flink_master)

    @property
    def checkpoint_every_ms(self) -> int:
        return round(self.checkpoint_every_s * 1000)

    @property
    def command(self) -> str:
        return "run" if self.train else "join"

    @classmethod
    def from_args(cls, args: argparse.Namespace, train: bool) -> "JobOptions":
        """The options of a parsed ``join`` / ``backfill`` / ``run`` command line."""
        watch = getattr(args, "watch", None)
        if getattr(args, "source", None) is not None:
            if watch is not None or getattr(args, "streaming", False):
                raise ValueError("--source kafka://... is its own mode: not with --streaming or --watch")
            mode = Mode.KAFKA
        else:
            mode = Mode.LIVE if watch is not None else Mode.REPLAY if getattr(args, "streaming", False) else Mode.BACKFILL
        values = {field: getattr(args, dest) for dest, field in _DESTS.items() if hasattr(args, dest)}
        values["progress"] = not getattr(args, "no_progress", False)
        return cls(train=train, mode=mode, watch_interval_s=watch, **values)

    def to_argv(self) -> list[str]:
        """The command line that parses back to these options, paths made absolute (for a job
        submitted to a cluster, which runs elsewhere). ``--flink-master`` is left out: the
        submitted command runs on that cluster."""
        argv = [self.command]
        if self.spec is not None:
            argv += ["--spec", str(Path(self.spec).resolve()) if Path(self.spec).is_file() else self.spec]
        for dest, field in _DESTS.items():
            value = getattr(self, field)
            if field in ("spec", "flink_master") or value is None or value == _DEFAULTS[field]:
                continue
            if field not in _TRAIN_ONLY or self.train:
                flag = "--" + dest.replace("_", "-")
                argv += [flag] if value is True else [flag, str(value.resolve() if isinstance(value, Path) else value)]
        if self.mode is Mode.REPLAY:
            argv.append("--streaming")
        if self.live:
            argv += ["--watch", repr(self.watch_interval_s)]
        if not self.progress and self.train:
            argv.append("--no-progress")
        return argv

    def replace(self, **changes) -> "JobOptions":
        return dataclasses.replace(self, **changes)


# argparse dest -> JobOptions field, for every option the parser has beyond the mode flags
# (--streaming, --watch, --no-progress); tests check that no parsed option is missing here.
_DESTS = {"spec": "spec", "logs": "logs", "out": "out", "runner": "runner", "flink_master": "flink_master",
          "checkpoint_every": "checkpoint_every_s", "parallelism": "parallelism",
          "events_per_step": "events_per_step", "resume": "resume", "stop_after": "stop_after_s",
          "device": "device", "model_dir": "model_dir", "store": "store", "trainers": "trainers",
          "source": "source", "kafka_jars": "kafka_jars", "backfill_until": "backfill_until_ms",
          "backfill_epochs": "backfill_epochs", "backfill_scale": "backfill_scale"}
_TRAIN_ONLY = {"device", "model_dir", "store", "trainers", "backfill_until_ms", "backfill_epochs", "backfill_scale"}
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(JobOptions)}
