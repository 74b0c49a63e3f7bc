"""The feature spec: one YAML file per model, loaded into the typed dataclasses of
``schemas.spec_types`` and validated.

A spec names the event schemas it reads, the embedding slots (their source fields, kind,
dim, expiry, frequency filter, initialiser, optimiser), the dense features and their
normalisation, the labels, the join window, the negative-sampling rate, the model and the
training / publish / snapshot settings. Every check runs at load time against the Avro
schemas; all problems are reported together, each naming the slot or field and the value.

Durations carry units (``30m``, ``7d``); they are held as integer milliseconds (``*_ms``).
"""
from __future__ import annotations

import dataclasses
import math
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from schemas.durations import format_duration_ms, parse_duration_ms, parse_instant_ms
from schemas.events import (
    EVENT_TIME_RANGE_MS,
    SchemaError,
    base_type,
    check_impression_schema,
    field_types,
    load_schema,
)
from schemas.fids import MAX_SLOT_ID
from schemas.spec_types import (
    EXAMPLE_LR,
    MAX_BATCH_SIZE,
    MAX_DIM,
    MAX_DURATION_MS,
    MAX_HIDDEN_UNITS,
    MAX_SPEC_BYTES,
    MAX_WORKERS,
    MAX_YAML_NODES,
    SEQUENTIAL_MAX_BATCH,
    CowClipSpec,
    DenseFeatureSpec,
    EventsSpec,
    FeatureSpec,
    InitializerKind,
    InitializerSpec,
    JoinSpec,
    LabelSpec,
    MissingPolicy,
    ModelKind,
    ModelSpec,
    Normalization,
    OptimizerKind,
    OptimizerSpec,
    PublishSpec,
    SamplingSpec,
    SlotKind,
    SlotSpec,
    SnapshotSpec,
    SpecError,
    TrainingSpec,
)

SPEC_DIR = Path(__file__).parent / "specs"

# --------------------------------------------------------------------------------------------
# Loading and validation


_CATEGORICAL_TYPES = {"string", "int", "long", "boolean"}
_NUMERIC_TYPES = {"int", "long", "float", "double"}


def builtin_spec_names() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def spec_path(name_or_path: str | Path) -> Path:
    """A built-in spec name (``movielens``) or a YAML path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    builtin = SPEC_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    raise SpecError(str(name_or_path), [f"no spec file and no built-in spec of that name {builtin_spec_names()}"])


def load_spec(name_or_path: str | Path) -> FeatureSpec:
    """Load and validate a spec; raises SpecError listing every problem."""
    path = spec_path(name_or_path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(str(path), [f"{size} bytes: a spec is at most {MAX_SPEC_BYTES}"])
        raw = _load_bounded_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(str(path), ["file does not exist"]) from None
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), [f"not UTF-8 text: {exc}"]) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise SpecError(str(path), [f"not valid YAML: {str(exc)[:300]}"]) from None
    base_dir = path.parent
    return parse_spec(raw, source=str(path), base_dir=base_dir)


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents whose aliases expand past ``MAX_YAML_NODES``
    nodes (a "billion laughs" of nested anchors), counted before anything is constructed."""

    def compose_document(self):
        node = super().compose_document()
        seen = [0]

        def count(current, depth=0):
            seen[0] += 1
            if seen[0] > MAX_YAML_NODES or depth > 100:
                raise yaml.YAMLError(f"more than {MAX_YAML_NODES} nodes once aliases are expanded, "
                                     f"or nested deeper than 100")
            if isinstance(current, yaml.SequenceNode):
                for item in current.value:
                    count(item, depth + 1)
            elif isinstance(current, yaml.MappingNode):
                for key, value in current.value:
                    count(key, depth + 1)
                    count(value, depth + 1)

        if node is not None:
            count(node)
        return node


def _load_bounded_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass


def parse_spec(raw: Any, source: str = "<spec>", base_dir: Path | None = None) -> FeatureSpec:
    """Validate a spec given as plain data (what the YAML holds)."""
    return _SpecParser(source, base_dir).parse(raw)


class _SpecParser:
    """Collects every error instead of stopping at the first."""

    def __init__(self, source: str, base_dir: Path | None):
        self.source = source
        self.base_dir = base_dir
        self.errors: list[str] = []

    def error(self, message: str) -> None:
        self.errors.append(message)

    # -- small typed readers ------------------------------------------------------------------
    def _mapping(self, value: Any, where: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(f"{where}: expected a mapping, got {value!r}")
            return {}
        return value

    def _unknown_keys(self, data: dict, allowed: set[str], where: str) -> None:
        for key in sorted(set(data) - allowed):
            self.error(f"{where}: unknown key {key!r} (allowed: {sorted(allowed)})")

    def _duration(self, value: Any, where: str, default: int | None) -> int | None:
        if value is None:
            return default
        try:
            ms = parse_duration_ms(value)
        except ValueError as exc:
            self.error(f"{where}: {exc}")
            return default
        if ms <= 0:
            self.error(f"{where}: must be > 0, got {value!r}")
            return default
        if ms > MAX_DURATION_MS:
            self.error(f"{where}: at most {format_duration_ms(MAX_DURATION_MS)}, got {value!r}")
            return default
        return ms

    def _time_range(self, value: Any, where: str) -> tuple[int, int]:
        """``[start, end]``: each a UTC date or date-time (YAML's own or ISO text) or ms since the epoch."""
        if value is None:
            return EVENT_TIME_RANGE_MS
        if not isinstance(value, list) or len(value) != 2:
            self.error(f"{where}: expected [start, end] (dates, times or ms), got {value!r:.80}")
            return EVENT_TIME_RANGE_MS
        bounds = []
        for label, item in zip(("start", "end"), value):
            try:
                bounds.append(parse_instant_ms(item))
            except (TypeError, ValueError, OverflowError) as exc:
                self.error(f"{where}: {label} {item!r:.80}: {exc}")
                return EVENT_TIME_RANGE_MS
        low, high = EVENT_TIME_RANGE_MS
        if not low <= bounds[0] < bounds[1] <= high:
            self.error(f"{where}: expected start < end within [1970-01-01, 2200-01-01), got {value!r:.80}")
            return EVENT_TIME_RANGE_MS
        return bounds[0], bounds[1]

    def _number(self, value: Any, where: str, default: float, *, minimum: float | None = None,
                integer: bool = False, exclusive: bool = False, maximum: float | None = None) -> Any:
        if value is None:
            return default
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            self.error(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r:.80}")
            return default
        if not math.isfinite(value):
            self.error(f"{where}: must be a finite number, got {value!r}")
            return default
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            self.error(f"{where}: must be {'>' if exclusive else '>='} {minimum}, got {value!r:.80}")
            return default
        if maximum is not None and value > maximum:
            self.error(f"{where}: must be <= {maximum}, got {value!r:.80}")
            return default
        return value

    def _enum(self, enum_type: type[Enum], value: Any, where: str, default: Enum) -> Any:
        if value is None:
            return default
        try:
            return enum_type(value)
        except ValueError:
            self.error(f"{where}: {value!r} is not one of {[e.value for e in enum_type]}")
            return default

    def _schema(self, value: str, role: str) -> tuple[str, dict | None]:
        name = str(value)
        if name.endswith(".avsc") and self.base_dir is not None and not Path(name).is_absolute():
            name = str(self.base_dir / name)
        try:
            return name, load_schema(name)
        except SchemaError as exc:
            self.error(f"events.{role}: {exc}")
            return name, None

    # -- sections ------------------------------------------------------------------------------
    def parse(self, raw: Any) -> FeatureSpec:
        top = self._mapping(raw, "spec")
        allowed = {"name", "events", "defaults", "slots", "dense", "labels", "join", "sampling",
                   "model", "training", "publish", "sync", "snapshot", "store"}
        self._unknown_keys(top, allowed, "spec")
        name = top.get("name")
        if not isinstance(name, str) or not name:
            self.error(f"name: expected a non-empty string, got {name!r}")
            name = "<unnamed>"

        events_raw = self._mapping(top.get("events"), "events")
        self._unknown_keys(events_raw, {"impression", "action", "time_range"}, "events")
        events = EventsSpec(**{k: str(v) for k, v in events_raw.items() if k in ("impression", "action")})
        events_impression, impression_schema = self._schema(events.impression, "impression")
        events_action, action_schema = self._schema(events.action, "action")
        events = EventsSpec(impression=events_impression, action=events_action,
                            time_range_ms=self._time_range(events_raw.get("time_range"), "events.time_range"))
        if impression_schema is not None:
            try:
                check_impression_schema(impression_schema)
            except SchemaError as exc:
                self.error(f"events.impression: {exc}")
        impression_fields = field_types(impression_schema) if impression_schema else None

        defaults = self._mapping(top.get("defaults"), "defaults")
        self._unknown_keys(defaults, {"dim", "expire_after", "min_count", "initializer", "optimizer", "missing"},
                           "defaults")
        slots = self._slots(top.get("slots"), defaults, impression_fields)
        dense = self._dense(top.get("dense"), impression_fields)
        labels = self._labels(top.get("labels"), action_schema)
        join = self._join(top.get("join"))
        sampling = self._sampling(top.get("sampling"))
        model = self._model(top.get("model"), slots)
        training = self._training(top.get("training"))
        publish = self._publish(top)
        snapshot_raw = self._mapping(top.get("snapshot"), "snapshot")
        self._unknown_keys(snapshot_raw, {"every", "keep"}, "snapshot")
        snapshot = SnapshotSpec(every_ms=self._duration(snapshot_raw.get("every"), "snapshot.every",
                                                        SnapshotSpec.every_ms),
                                keep=self._snapshots_kept(snapshot_raw.get("keep")))
        store = top.get("store")
        if store is not None and not isinstance(store, str):
            self.error(f"store: expected a URI string, got {store!r}")
            store = None
        elif store is not None and store.split("://", 1)[0] not in ("redis", "redis+cluster"):
            self.error(f"store: expected redis://host:port[,host:port...] or redis+cluster://host:port, got {store!r}")
            store = None
        if self.errors:
            raise SpecError(self.source, self.errors)
        return FeatureSpec(name=name, events=events, slots=slots, dense=dense, labels=labels, join=join,
                           sampling=sampling, model=model, training=training, publish=publish,
                           snapshot=snapshot, store=store)

    def _optimizer(self, raw: Any, where: str, base: OptimizerSpec) -> OptimizerSpec:
        data = self._mapping(raw, where)
        names = {f.name for f in dataclasses.fields(OptimizerSpec)}
        self._unknown_keys(data, names, where)
        values = {}
        for key, value in data.items():
            if key == "kind":
                values["kind"] = self._enum(OptimizerKind, value, f"{where}.kind", base.kind)
            elif key in names:
                values[key] = self._number(value, f"{where}.{key}", getattr(base, key), minimum=0.0)
        return dataclasses.replace(base, **values)

    def _initializer(self, raw: Any, where: str, base: InitializerSpec) -> InitializerSpec:
        data = self._mapping(raw, where)
        self._unknown_keys(data, {"kind", "scale"}, where)
        return InitializerSpec(
            kind=self._enum(InitializerKind, data.get("kind"), f"{where}.kind", base.kind),
            scale=self._number(data.get("scale"), f"{where}.scale", base.scale, minimum=0.0),
        )

    def _slots(self, raw: Any, defaults: dict, fields: dict | None) -> tuple[SlotSpec, ...]:
        if not isinstance(raw, list) or not raw:
            self.error(f"slots: expected a non-empty list of slots, got {raw!r}")
            return ()
        if len(raw) > MAX_SLOT_ID:
            self.error(f"slots: {len(raw)} slots, but the fid layout (15-bit slot id) allows at most {MAX_SLOT_ID}")
        default_dim = self._number(defaults.get("dim"), "defaults.dim", 16, minimum=0, integer=True, exclusive=True,
                                   maximum=MAX_DIM)
        default_expire = (None if defaults.get("expire_after") in (None, "never")
                          else self._duration(defaults.get("expire_after"), "defaults.expire_after", None))
        default_min = self._number(defaults.get("min_count"), "defaults.min_count", 1, minimum=1, integer=True)
        default_init = self._initializer(defaults.get("initializer"), "defaults.initializer", InitializerSpec())
        # The sparse lr, unless named: Vowpal Wabbit's per-example rate shared out over the slots,
        # so an example moves its score by about as much whatever its number of fids.
        default_opt = self._optimizer(defaults.get("optimizer"), "defaults.optimizer",
                                      OptimizerSpec(lr=EXAMPLE_LR / len(raw)))
        default_missing = self._enum(MissingPolicy, defaults.get("missing"), "defaults.missing", MissingPolicy.DEFAULT)

        slots: list[SlotSpec] = []
        seen_names: set[str] = set()
        seen_ids: dict[int, str] = {}
        allowed = {"name", "id", "kind", "source", "cross", "dim", "expire_after", "min_count", "initializer",
                   "optimizer", "boundaries", "missing"}
        for index, entry in enumerate(raw):
            data = self._mapping(entry, f"slots[{index}]")
            name = data.get("name")
            if not isinstance(name, str) or not name:
                self.error(f"slots[{index}]: expected a non-empty 'name', got {name!r}")
                continue
            where = f"slot {name!r}"
            self._unknown_keys(data, allowed, where)
            if name in seen_names:
                self.error(f"{where}: duplicate slot name")
                continue
            seen_names.add(name)
            slot_id = self._number(data.get("id"), f"{where}: id", index + 1, minimum=1, integer=True)
            if slot_id > MAX_SLOT_ID:
                self.error(f"{where}: id {slot_id} does not fit the fid layout's 15-bit slot (max {MAX_SLOT_ID})")
            if slot_id in seen_ids:
                self.error(f"{where}: id {slot_id} already used by slot {seen_ids[slot_id]!r}")
            seen_ids[slot_id] = name
            kind = self._enum(SlotKind, data.get("kind"), f"{where}: kind", SlotKind.CATEGORICAL)
            dim = data.get("dim", default_dim)
            if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
                self.error(f"{where}: dim must be an integer > 0, got {dim!r:.80}")
                dim = default_dim
            elif dim > MAX_DIM:
                self.error(f"{where}: dim must be at most {MAX_DIM}, got {dim!r:.80}")
                dim = default_dim
            expire_raw = data.get("expire_after")
            expire = (default_expire if expire_raw is None else None if expire_raw == "never"
                      else self._duration(expire_raw, f"{where}: expire_after", default_expire))
            min_count = self._number(data.get("min_count"), f"{where}: min_count", default_min, minimum=1,
                                     integer=True)
            boundaries: tuple[float, ...] = ()
            if kind is SlotKind.CROSS:
                crossed = data.get("cross")
                if not isinstance(crossed, list) or len(crossed) < 2:
                    self.error(f"{where}: a cross needs 'cross: [slot, slot, ...]' with two or more slots, "
                               f"got {crossed!r}")
                    crossed = []
                source = tuple(str(c) for c in crossed)
            else:
                src = data.get("source")
                if not isinstance(src, str) or not src:
                    self.error(f"{where}: expected a 'source' field name, got {src!r}")
                    src = ""
                source = (src,)
                if src and fields is not None:
                    self._check_source(where, kind, src, fields)
            if kind is SlotKind.BUCKETIZED:
                raw_edges = data.get("boundaries")
                if (not isinstance(raw_edges, list) or not raw_edges
                        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                                   for b in raw_edges)):
                    self.error(f"{where}: a bucketized slot needs a list of finite numbers as 'boundaries', got {raw_edges!r:.200}")
                elif list(raw_edges) != sorted(set(raw_edges)):
                    self.error(f"{where}: boundaries must be strictly increasing, got {raw_edges!r}")
                else:
                    boundaries = tuple(float(b) for b in raw_edges)
            slots.append(SlotSpec(
                name=name, slot_id=slot_id, kind=kind, source=source, dim=dim, expire_after_ms=expire,
                min_count=min_count,
                initializer=self._initializer(data.get("initializer"), f"{where}: initializer", default_init),
                optimizer=self._optimizer(data.get("optimizer"), f"{where}: optimizer", default_opt),
                boundaries=boundaries,
                missing=self._enum(MissingPolicy, data.get("missing"), f"{where}: missing", default_missing),
            ))
        by_name = {s.name: s for s in slots}
        for slot in slots:
            if slot.kind is SlotKind.CROSS:
                for crossed in slot.source:
                    if crossed == slot.name:
                        self.error(f"slot {slot.name!r}: a cross cannot include itself")
                    elif crossed not in by_name:
                        self.error(f"slot {slot.name!r}: crosses unknown slot {crossed!r}")
                    elif by_name[crossed].kind is SlotKind.CROSS:
                        self.error(f"slot {slot.name!r}: crosses slot {crossed!r}, which is itself a cross")
        return tuple(slots)

    def _check_source(self, where: str, kind: SlotKind, src: str, fields: dict) -> None:
        if src not in fields:
            self.error(f"{where}: source field {src!r} is not in the impression schema (fields: {sorted(fields)})")
            return
        avro_type, _ = base_type(fields[src])
        type_name = avro_type if isinstance(avro_type, str) else avro_type.get("type")
        if kind is SlotKind.MULTI_VALUED:
            ok = isinstance(avro_type, dict) and avro_type.get("type") == "array" and (
                avro_type["items"] in _CATEGORICAL_TYPES)
            expected = "an array of strings or integers"
        elif kind is SlotKind.BUCKETIZED:
            ok = type_name in _NUMERIC_TYPES
            expected = "a numeric field"
        else:
            ok = type_name in _CATEGORICAL_TYPES or type_name == "enum"
            expected = "a string, integer, boolean or enum field"
        if not ok:
            self.error(f"{where}: source field {src!r} has type {avro_type!r}, a {kind.value} slot needs {expected}")

    def _dense(self, raw: Any, fields: dict | None) -> tuple[DenseFeatureSpec, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.error(f"dense: expected a list, got {raw!r}")
            return ()
        features = []
        seen: set[str] = set()
        for index, entry in enumerate(raw):
            data = self._mapping(entry, f"dense[{index}]")
            name = data.get("name")
            if not isinstance(name, str) or not name:
                self.error(f"dense[{index}]: expected a non-empty 'name', got {name!r}")
                continue
            where = f"dense feature {name!r}"
            if name in seen:
                self.error(f"{where}: duplicate dense feature name")
            seen.add(name)
            self._unknown_keys(data, {"name", "source", "normalization", "mean", "std", "min", "max", "default"},
                               where)
            source = data.get("source", name)
            if fields is not None:
                if source not in fields:
                    self.error(f"{where}: source field {source!r} is not in the impression schema")
                elif not isinstance(base_type(fields[source])[0], str) or base_type(fields[source])[0] not in _NUMERIC_TYPES:
                    self.error(f"{where}: source field {source!r} has type {fields[source]!r}, needs a numeric field")
            norm = self._enum(Normalization, data.get("normalization"), f"{where}: normalization", Normalization.NONE)
            feature = DenseFeatureSpec(
                name=name, source=source, normalization=norm,
                mean=self._number(data.get("mean"), f"{where}: mean", 0.0),
                std=self._number(data.get("std"), f"{where}: std", 1.0, minimum=0.0, exclusive=True),
                min=self._number(data.get("min"), f"{where}: min", 0.0),
                max=self._number(data.get("max"), f"{where}: max", 1.0),
                default=self._number(data.get("default"), f"{where}: default", 0.0),
            )
            if norm is Normalization.MINMAX and feature.max <= feature.min:
                self.error(f"{where}: minmax needs max > min, got min={feature.min} max={feature.max}")
            features.append(feature)
        return tuple(features)

    def _labels(self, raw: Any, action_schema: dict | None) -> LabelSpec:
        data = self._mapping(raw, "labels")
        self._unknown_keys(data, {"actions", "target"}, "labels")
        actions = data.get("actions")
        if not isinstance(actions, list) or not actions or not all(isinstance(a, str) for a in actions):
            self.error(f"labels.actions: expected a non-empty list of action types, got {actions!r}")
            actions = []
        if action_schema is not None:
            symbols = self._action_symbols(action_schema)
            for action in actions:
                if symbols is not None and action not in symbols:
                    self.error(f"labels.actions: {action!r} is not an action type of the action schema {symbols}")
        target = data.get("target", actions[0] if actions else None)
        if target not in actions:
            self.error(f"labels.target: {target!r} must be one of labels.actions {actions}")
        return LabelSpec(actions=tuple(actions), target=str(target))

    @staticmethod
    def _action_symbols(action_schema: dict) -> list[str] | None:
        avro_type = field_types(action_schema).get("action_type")
        if isinstance(avro_type, dict) and avro_type.get("type") == "enum":
            return [s for s in avro_type["symbols"] if s != "UNKNOWN"]
        return None

    def _join(self, raw: Any) -> JoinSpec:
        data = self._mapping(raw, "join")
        self._unknown_keys(data, {"window", "emit_positive_early"}, "join")
        early = data.get("emit_positive_early", False)
        if not isinstance(early, bool):
            self.error(f"join.emit_positive_early: expected true or false, got {early!r}")
            early = False
        return JoinSpec(window_ms=self._duration(data.get("window"), "join.window", JoinSpec.window_ms),
                        emit_positive_early=early)

    def _sampling(self, raw: Any) -> SamplingSpec:
        data = self._mapping(raw, "sampling")
        self._unknown_keys(data, {"negative_rate", "seed"}, "sampling")
        rate = self._number(data.get("negative_rate"), "sampling.negative_rate", 1.0, minimum=0.0, exclusive=True)
        if rate > 1.0:
            self.error(f"sampling.negative_rate: must be in (0, 1], got {rate!r}")
            rate = 1.0
        return SamplingSpec(negative_rate=float(rate),
                            seed=self._number(data.get("seed"), "sampling.seed", 0, minimum=0, integer=True))

    def _model(self, raw: Any, slots: tuple[SlotSpec, ...]) -> ModelSpec:
        data = self._mapping(raw, "model")
        self._unknown_keys(data, {"kind", "hidden_units", "dropout", "cross_layers"}, "model")
        kind = self._enum(ModelKind, data.get("kind"), "model.kind", ModelKind.DEEPFM)
        hidden = data.get("hidden_units", list(ModelSpec.hidden_units))
        if not isinstance(hidden, list) or not all(isinstance(h, int) and not isinstance(h, bool)
                                                   and 0 < h <= MAX_HIDDEN_UNITS for h in hidden):
            self.error(f"model.hidden_units: expected a list of integers in [1, {MAX_HIDDEN_UNITS}], got {hidden!r:.200}")
            hidden = list(ModelSpec.hidden_units)
        dropout = self._number(data.get("dropout"), "model.dropout", 0.0, minimum=0.0)
        if dropout >= 1.0:
            self.error(f"model.dropout: must be in [0, 1), got {dropout!r}")
        if kind is ModelKind.DEEPFM and len({s.dim for s in slots}) > 1:
            dims = {s.name: s.dim for s in slots}
            self.error(f"model.kind: deepfm's factorisation machine needs one dim for every slot, got {dims}")
        return ModelSpec(kind=kind, hidden_units=tuple(hidden), dropout=float(dropout),
                         cross_layers=self._number(data.get("cross_layers"), "model.cross_layers", 3, minimum=1,
                                                   integer=True))

    def _training(self, raw: Any) -> TrainingSpec:
        data = self._mapping(raw, "training")
        self._unknown_keys(data, {"batch_size", "dense_optimizer", "cowclip", "warmup_steps", "metrics_window",
                                  "sequential_updates", "workers"}, "training")
        sequential = data.get("sequential_updates", "auto")
        if sequential not in ("auto", True, False):
            self.error(f"training.sequential_updates: expected auto, true or false, got {sequential!r}")
            sequential = "auto"
        cow = self._mapping(data.get("cowclip"), "training.cowclip")
        self._unknown_keys(cow, {"enabled", "ratio", "min_clip"}, "training.cowclip")
        cowclip = CowClipSpec(
            enabled=bool(cow.get("enabled", bool(cow))),
            ratio=self._number(cow.get("ratio"), "training.cowclip.ratio", 1.0, minimum=0.0, exclusive=True),
            min_clip=self._number(cow.get("min_clip"), "training.cowclip.min_clip", 1e-5, minimum=0.0),
        )
        batch_size = self._number(data.get("batch_size"), "training.batch_size", TrainingSpec.batch_size, minimum=1,
                                  integer=True, maximum=MAX_BATCH_SIZE)
        if sequential is True and batch_size > SEQUENTIAL_MAX_BATCH:
            self.error(f"training.sequential_updates: true needs batch_size <= {SEQUENTIAL_MAX_BATCH} (their cost "
                       f"grows with the square of the batch), got batch_size {batch_size}")
        workers = self._number(data.get("workers"), "training.workers", 1, minimum=1, integer=True,
                               maximum=MAX_WORKERS)
        if sequential is True and workers > 1:
            self.error(f"training.sequential_updates: true is single-worker (in-batch updates couple a batch's "
                       f"examples through shared rows), got workers {workers}: use false or auto")
        return TrainingSpec(
            batch_size=batch_size,
            workers=workers,
            sequential_updates=None if sequential == "auto" else sequential,
            dense_optimizer=self._optimizer(data.get("dense_optimizer"), "training.dense_optimizer",
                                            TrainingSpec.dense_optimizer),
            cowclip=cowclip,
            warmup_steps=self._number(data.get("warmup_steps"), "training.warmup_steps", 0, minimum=0, integer=True),
            metrics_window_ms=self._duration(data.get("metrics_window"), "training.metrics_window",
                                             TrainingSpec.metrics_window_ms),
        )

    def _snapshots_kept(self, value: Any) -> int | None:
        """``snapshot.keep``: a number of snapshots (>= 1) or ``all``."""
        if value == "all":
            return None
        if isinstance(value, str):
            self.error(f"snapshot.keep: expected a number of snapshots (>= 1) or 'all', got {value!r:.80}")
            return SnapshotSpec.keep
        return self._number(value, "snapshot.keep", SnapshotSpec.keep, minimum=1, integer=True)

    def _publish(self, top: dict) -> PublishSpec:
        """``publish:``; ``sync:``, its name before, is read the same (both at once is an error)."""
        key = "publish"
        if "sync" in top:
            if "publish" in top:
                self.error("publish and sync: give one (sync is the older name of publish)")
            key = "publish" if "publish" in top else "sync"
        data = self._mapping(top.get(key), key)
        self._unknown_keys(data, {"sparse_every", "dense_every"}, key)
        return PublishSpec(
            sparse_every_ms=self._duration(data.get("sparse_every"), f"{key}.sparse_every",
                                           PublishSpec.sparse_every_ms),
            dense_every_ms=self._duration(data.get("dense_every"), f"{key}.dense_every", PublishSpec.dense_every_ms),
        )
