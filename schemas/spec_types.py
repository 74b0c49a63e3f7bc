"""The feature spec's types: typed, frozen dataclasses for every section of a spec, their enums
and the bounds validation holds them to (``schemas.spec`` loads and validates the YAML into them).

Durations are held as integer milliseconds (``*_ms``).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from schemas.durations import format_duration_ms
from schemas.events import EVENT_TIME_RANGE_MS


class SpecError(ValueError):
    """A feature spec failed validation; ``errors`` lists every problem found."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s):\n" + "\n".join(f"  - {e}" for e in errors))


class SlotKind(str, Enum):
    CATEGORICAL = "categorical"  # one value -> one fid
    MULTI_VALUED = "multi_valued"  # a list of values -> one fid each, pooled
    CROSS = "cross"  # the cartesian product of other slots' values
    BUCKETIZED = "bucketized"  # a numeric value -> the fid of its bucket


class MissingPolicy(str, Enum):
    DEFAULT = "default"  # a missing value maps to the slot's default fid
    DEAD_LETTER = "dead_letter"  # the impression goes to the dead letters


class OptimizerKind(str, Enum):
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ADAM = "adam"
    FTRL = "ftrl"


#: Optimiser state held per embedding element (floats) beside the embedding itself.
STATE_FLOATS_PER_DIM = {
    OptimizerKind.SGD: 0,
    OptimizerKind.ADAGRAD: 1,  # squared-gradient accumulator
    OptimizerKind.ADAM: 2,  # first and second moments
    OptimizerKind.FTRL: 2,  # z and n
}

#: Per-row bookkeeping beside the floats: 8 B fid key, 8 B last-seen event time, 4 B count.
ROW_METADATA_BYTES = 8 + 8 + 4


class InitializerKind(str, Enum):
    NORMAL = "normal"
    TRUNCATED_NORMAL = "truncated_normal"
    UNIFORM = "uniform"
    ZEROS = "zeros"


class Normalization(str, Enum):
    NONE = "none"
    STANDARD = "standard"  # (x - mean) / std
    MINMAX = "minmax"  # (x - min) / (max - min), clipped to [0, 1]
    LOG1P = "log1p"  # log(1 + max(x, 0))


class ModelKind(str, Enum):
    DEEPFM = "deepfm"
    WIDE_DEEP = "wide_deep"
    DCN = "dcn"
    DCNV2 = "dcnv2"
    DNN = "dnn"


#: The default sparse learning rate per example: each of ``n`` slots gets ``EXAMPLE_LR / n``
#: (VW's default rate is 0.5; measured: MovieLens, 9 slots, 0.056: AUC 0.7642 vs 0.7617 at 0.04;
#: the synthetic stream, 26 slots, 0.019: 0.7064 vs 0.6949 at 0.05).
EXAMPLE_LR = 0.5


@dataclass(frozen=True)
class OptimizerSpec:
    kind: OptimizerKind = OptimizerKind.ADAGRAD
    lr: float = 0.05
    l2: float = 0.0
    l1: float = 0.0  # FTRL only
    beta1: float = 0.9  # Adam
    beta2: float = 0.999  # Adam
    eps: float = 1e-8
    initial_accumulator: float = 0.1  # Adagrad / FTRL n0: bounds the first steps (lr * g / sqrt(n0 + g^2))

    @property
    def state_floats_per_dim(self) -> int:
        return STATE_FLOATS_PER_DIM[self.kind]


@dataclass(frozen=True)
class InitializerSpec:
    kind: InitializerKind = InitializerKind.NORMAL
    scale: float = 0.01  # std for normal kinds, half-width for uniform


@dataclass(frozen=True)
class SlotSpec:
    name: str
    slot_id: int  # the 15-bit slot of the fid layout
    kind: SlotKind
    source: tuple[str, ...]  # impression field(s); for a cross: the slots it crosses
    dim: int
    expire_after_ms: int | None  # None: rows of this slot never expire
    min_count: int  # occurrences before a fid gets a row (1: no filter)
    initializer: InitializerSpec
    optimizer: OptimizerSpec
    boundaries: tuple[float, ...] = ()  # bucketized only: sorted bucket edges
    missing: MissingPolicy = MissingPolicy.DEFAULT

    @property
    def bytes_per_row(self) -> int:
        """Estimated table bytes per row: fp32 embedding + optimiser state + metadata."""
        floats = self.dim * (1 + self.optimizer.state_floats_per_dim)
        return 4 * floats + ROW_METADATA_BYTES


@dataclass(frozen=True)
class DenseFeatureSpec:
    name: str
    source: str
    normalization: Normalization = Normalization.NONE
    mean: float = 0.0
    std: float = 1.0
    min: float = 0.0
    max: float = 1.0
    default: float = 0.0  # used when the value is missing (null)


@dataclass(frozen=True)
class EventsSpec:
    impression: str = "impression"  # built-in schema name or .avsc path
    action: str = "action"
    # [start, end) ms since the epoch: records with event times outside are dead letters
    # (event_time_out_of_range). Spec: ``time_range: [2020-01-01, 2030-01-01]`` (UTC dates or
    # times, or ms); at most the default [1970, 2200).
    time_range_ms: tuple[int, int] = EVENT_TIME_RANGE_MS


@dataclass(frozen=True)
class LabelSpec:
    actions: tuple[str, ...]  # action types that become labels
    target: str  # the one the model is trained on


@dataclass(frozen=True)
class JoinSpec:
    window_ms: int = 30 * 60_000  # how long an impression waits for its actions (event time)
    emit_positive_early: bool = False  # emit as soon as the first target action joins


@dataclass(frozen=True)
class SamplingSpec:
    negative_rate: float = 1.0  # r: probability of keeping a negative; positives are always kept
    seed: int = 0


@dataclass(frozen=True)
class ModelSpec:
    kind: ModelKind = ModelKind.DEEPFM
    hidden_units: tuple[int, ...] = (256, 128)  # online default; the CowClip paper used 400-400-400
    dropout: float = 0.0
    cross_layers: int = 3  # DCN / DCNv2


@dataclass(frozen=True)
class CowClipSpec:
    """Adaptive per-id clipping: clip_j = cnt_j * max(ratio * ||w_j||, min_clip)."""

    enabled: bool = False
    ratio: float = 1.0
    min_clip: float = 1e-5


#: Bounds a spec must keep (beyond them allocations fail or integers overflow far from the cause).
MAX_DIM = 4096
MAX_HIDDEN_UNITS = 65_536
MAX_BATCH_SIZE = 1 << 24
MAX_WORKERS = 256  # trainer workers of one model
MAX_DURATION_MS = 100 * 365 * 86_400_000  # a century
MAX_SPEC_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # after anchors and aliases are expanded

#: The largest batch that takes sequential in-batch updates by default (``trainer.in_batch``),
#: and the largest that may take them at all (their cost grows with the square of the batch).
SEQUENTIAL_AUTO_MAX_BATCH = 128
SEQUENTIAL_MAX_BATCH = 1024


@dataclass(frozen=True)
class TrainingSpec:
    """Defaults for online training: small batches whose sparse rows are updated as if example
    by example (``sequential_updates``), so the first examples of a session inform the next."""

    batch_size: int = 64
    dense_optimizer: OptimizerSpec = OptimizerSpec(kind=OptimizerKind.ADAM, lr=0.001)
    cowclip: CowClipSpec = CowClipSpec()
    warmup_steps: int = 0  # dense learning rate ramps linearly over this many batches
    metrics_window_ms: int = 3_600_000  # progressive metrics are reported per window of event time
    sequential_updates: bool | None = None  # None (auto): for batches up to SEQUENTIAL_AUTO_MAX_BATCH without CowClip
    workers: int = 1  # trainer workers of one model (Flink): rows sharded by fid, batch_size per worker

    @property
    def uses_sequential_updates(self) -> bool:
        """Sequential in-batch updates are single-worker (``trainer.sharded``)."""
        if self.workers > 1:
            return False
        if self.sequential_updates is not None:
            return self.sequential_updates
        return self.batch_size <= SEQUENTIAL_AUTO_MAX_BATCH and not self.cowclip.enabled

    @property
    def per_example_squares(self) -> bool:
        """Whether a plain (not sequential) batch step's Adagrad / FTRL accumulator takes the sum
        of each example's squared gradient - what the examples one at a time would accumulate -
        rather than the square of their summed gradient (standard mini-batch Adagrad): only for
        global batches (``batch_size * workers``) up to ``SEQUENTIAL_MAX_BATCH``. Nothing inside
        a batch feeds back, so with per-example squares an id seen ``c`` times moves by up to
        ``sqrt(c) * lr`` at once: at large batches the frequent ids diverged (cowclip-batch, test
        AUC at batch 16K on 1M synthetic impressions 0.6185 with them, 0.6807 without; at 64K on
        4.1M, 0.5000 and 0.6888), while up to 1K they trained as well or better (batch 256: 0.6827
        and 0.6847; K=4 x 256 in bench.scaling: 0.5943 and 0.5515)."""
        return self.batch_size * self.workers <= SEQUENTIAL_MAX_BATCH


@dataclass(frozen=True)
class PublishSpec:
    """How often the trainer publishes to serving (``trainer.publish``), in data time."""

    sparse_every_ms: int = 60_000  # touched rows (a sparse delta)
    dense_every_ms: int = 86_400_000  # dense weights


@dataclass(frozen=True)
class SnapshotSpec:
    """How often the trainer snapshots its whole state to the model directory, in data time, and
    how many snapshots it keeps: once a snapshot makes more than ``keep``, every version before
    the oldest kept one leaves the manifest and the directory (None: keep everything)."""

    every_ms: int = 86_400_000
    keep: int | None = 7


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    events: EventsSpec
    slots: tuple[SlotSpec, ...]
    dense: tuple[DenseFeatureSpec, ...]
    labels: LabelSpec
    join: JoinSpec
    sampling: SamplingSpec
    model: ModelSpec
    training: TrainingSpec
    publish: PublishSpec
    snapshot: SnapshotSpec
    store: str | None = None  # URI of an external row store; None: in memory

    def slot(self, name: str) -> SlotSpec:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise KeyError(f"spec {self.name!r} has no slot {name!r}")

    @property
    def bytes_per_row_by_slot(self) -> dict[str, int]:
        return {slot.name: slot.bytes_per_row for slot in self.slots}

    def summary(self) -> str:
        """A human-readable table of the spec (what ``streamrec validate`` prints)."""
        lines = [
            f"spec {self.name!r}: impressions {self.events.impression!r}, actions {self.events.action!r}",
            f"  labels {list(self.labels.actions)} (target {self.labels.target!r}); "
            f"join window {format_duration_ms(self.join.window_ms)}; "
            f"negatives kept at rate {self.sampling.negative_rate:g}",
            f"  model {self.model.kind.value} {list(self.model.hidden_units)}; "
            f"batch {self.training.batch_size}; cowclip {'on' if self.training.cowclip.enabled else 'off'}",
            f"  {len(self.slots)} slots, {len(self.dense)} dense features",
            f"  {'slot':<20} {'id':>5} {'kind':<13} {'source':<28} {'dim':>4} {'expire':>7} "
            f"{'min':>4} {'optimizer':<9} {'B/row':>6}",
        ]
        for s in self.slots:
            expire = format_duration_ms(s.expire_after_ms) if s.expire_after_ms else "never"
            lines.append(
                f"  {s.name:<20} {s.slot_id:>5} {s.kind.value:<13} {' x '.join(s.source):<28} {s.dim:>4} "
                f"{expire:>7} {s.min_count:>4} {s.optimizer.kind.value:<9} {s.bytes_per_row:>6}"
            )
        for d in self.dense:
            lines.append(f"  dense {d.name:<14} from {d.source!r}, {d.normalization.value}")
        return "\n".join(lines)
