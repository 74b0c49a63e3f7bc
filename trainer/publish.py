"""Publishing a training run to a model directory: snapshots, sparse deltas and dense weights.

Layout of ``MODEL_DIR`` (a local directory)::

    spec.json                     the FeatureSpec the model was trained with (schemas.spec_json)
    manifest.json                 {"versions": [entry, ...]} in version order (rewritten atomically)
    v000001-snapshot/             full state: table-<g>.arrow (rows with optimizer state),
                                  state.pt (dense weights, dense optimizer, metrics, position)
    v000002-sparse.arrow          rows touched since the previous delta + fids removed by expiry
    v000003-dense.pt              dense weights

Every entry is ``{"version", "kind": "snapshot"|"sparse"|"dense", "path", "base_version",
"data_time_ms", "published_at", "sha256": {file: hex}, "shards"}``; ``base_version`` is the version it
applies on top of (the previous one). Files are complete before the manifest names them (written
under a temporary name, then renamed), so a reader never sees a half-written version; the
checksums catch files damaged later. Versions are applied in order: snapshot, then each delta
whose ``base_version`` is the version in hand.

A model trained by K workers (``trainer.sharded``, ``"shards": K``; 1 when absent) publishes
each version in K parts: worker r writes the rows it owns (``v000002-sparse-<r>.arrow``,
``v000001-snapshot/table-<g>-<r>.arrow``), worker 0 the dense weights and training state; the
workers meet at a barrier once their parts are written, and only then does worker 0 name the
version in the manifest - so every version a reader sees is complete. A snapshot holds every
shard at the same position (they train in lockstep), and a resume needs the same K.

Nothing read from a model directory can run code: the spec is JSON, tables are Arrow, and
``.pt`` files are loaded with ``torch.load(weights_only=True)`` (tensors and plain containers
only). Every manifest entry is checked field by field, and every path it names must be a plain
relative name that stays inside the directory (no ``..``, no absolute path, no symlink out).

Schedule (on the job's clock - event time when replaying, processing time when live): a sparse
delta every ``publish.sparse_every``, dense weights every ``publish.dense_every``, a snapshot every
``snapshot.every`` (and one at the start, so serving has a base). Retention: the newest
``snapshot.keep`` snapshots (default 7) and the versions after the oldest of them; a snapshot that
makes one more prunes the versions before it, from the manifest first and then from the
directory, so a live job's manifest and disk stay bounded.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from schemas.events import END_OF_TIME_MS
from schemas.files import atomic_write, file_sha256
from schemas.spec_json import SpecJsonError, spec_from_json, spec_to_json
from schemas.spec_types import FeatureSpec
from trainer.rows import RowBatch
from trainer.table_snapshot import load_table, save_table

MANIFEST = "manifest.json"
SPEC_FILE = "spec.json"
ENTRY_KINDS = ("snapshot", "sparse", "dense")
#: A version's file or snapshot directory, or one being written (``.NAME...tmp``): group 1 is the version.
_VERSION_FILE = re.compile(r"^\.?v(\d{6,})-(?:snapshot|sparse|dense)")


class ModelDirError(ValueError):
    """A model directory, version or file that cannot be used (names the version and the reason)."""


def read_manifest(model_dir: str | Path) -> list[dict]:
    """The manifest's entries, each checked (``check_entry``); ModelDirError names what is wrong."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
    except (ValueError, OSError, RecursionError) as exc:
        raise ModelDirError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("versions"), list):
        raise ModelDirError(f"{path}: a manifest is an object with a list 'versions', got {type(raw).__name__}")
    return [check_entry(model_dir, entry, index) for index, entry in enumerate(raw["versions"])]


def _field(entry: dict, key: str, types: tuple, where: str):
    value = entry.get(key)
    if not isinstance(value, types) or isinstance(value, bool):
        raise ModelDirError(f"{where}: {key!r} must be {' or '.join(t.__name__ for t in types)}, got {value!r:.80}")
    return value


def _inside(model_dir: Path, name: str, where: str) -> Path:
    """``model_dir / name`` if ``name`` is a plain relative path that stays inside ``model_dir``."""
    parts = name.split("/") if isinstance(name, str) else []
    if (not parts or name.startswith("/") or "\\" in name or ":" in name
            or any(part in ("", ".", "..") for part in parts)):
        raise ModelDirError(f"{where}: path {name!r:.120} is not a plain relative name inside the model directory")
    path = model_dir / name
    try:
        if not path.resolve().is_relative_to(model_dir.resolve()):
            raise ModelDirError(f"{where}: path {name!r} leads outside the model directory")
    except OSError as exc:
        raise ModelDirError(f"{where}: path {name!r}: {exc}") from exc
    return path


def check_entry(model_dir: Path, entry, index: int) -> dict:
    """A manifest entry with the fields, types and confined paths serving and resume rely on
    (they use an entry's paths as they are: this is where they are checked)."""
    where = f"manifest entry {index}"
    if not isinstance(entry, dict):
        raise ModelDirError(f"{where}: expected an object, got {entry!r:.80}")
    version = _field(entry, "version", (int,), where)
    where = f"manifest entry {index} (version {version})"
    if entry.get("kind") not in ENTRY_KINDS:
        raise ModelDirError(f"{where}: 'kind' must be one of {list(ENTRY_KINDS)}, got {entry.get('kind')!r:.80}")
    _field(entry, "base_version", (int,), where)
    _field(entry, "data_time_ms", (int,), where)
    _field(entry, "published_at", (int, float), where)
    _inside(model_dir, _field(entry, "path", (str,), where), where)
    shards = entry.setdefault("shards", 1)
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ModelDirError(f"{where}: 'shards' must be a positive integer, got {shards!r:.80}")
    checksums = _field(entry, "sha256", (dict,), where)
    for name, digest in checksums.items():
        _inside(model_dir, name, where)
        if not isinstance(digest, str):
            raise ModelDirError(f"{where}: checksum of {name!r} must be a string, got {digest!r:.80}")
    return entry


def read_spec(model_dir: str | Path) -> FeatureSpec:
    path = Path(model_dir) / SPEC_FILE
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: no {SPEC_FILE} - not a model directory (or nothing published yet)")
    try:
        return spec_from_json(path.read_bytes())
    except SpecJsonError as exc:
        raise ModelDirError(f"{path}: {exc}") from None


def load_tensors(path: Path, where: str, device="cpu"):
    """A ``.pt`` file of tensors and plain containers (``weights_only``: nothing else is unpickled)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or disallowed content
        raise ModelDirError(f"{where}: {path.name} is not a plain tensor file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def verify(model_dir: Path, entry: dict) -> None:
    """Raise ModelDirError unless every file of ``entry`` (from ``read_manifest``, so its names are
    confined to the directory) is present with its checksum."""
    for name, expected in entry["sha256"].items():
        path = model_dir / name
        if not path.is_file():
            raise ModelDirError(f"version {entry['version']} ({entry['kind']}): {name} is missing")
        if file_sha256(path) != expected:
            raise ModelDirError(f"version {entry['version']} ({entry['kind']}): {name} is corrupt (checksum mismatch)")


def _listed(entry: dict, names: list[str]) -> list[str]:
    """``names``, each a file the entry lists with its checksum (so ``verify`` covers it)."""
    for name in names:
        if name not in entry["sha256"]:
            raise ModelDirError(f"version {entry['version']} ({entry['kind']}): {name} is not listed in its checksums")
    return names


def shard_file(name: str, shard: int, shards: int) -> str:
    """Shard ``shard``'s part of the file ``name`` (``x.arrow`` -> ``x-<shard>.arrow``; the name
    itself with one shard)."""
    return name if shards == 1 else name.replace(".arrow", f"-{shard}.arrow")


def sparse_parts(entry: dict) -> list[str]:
    """The files of a sparse delta: one per shard (their union is the delta); the entry's path is
    shard 0's."""
    shards = entry["shards"]
    name = entry["path"] if shards == 1 else entry["path"].removesuffix("-0.arrow") + ".arrow"
    return _listed(entry, [shard_file(name, shard, shards) for shard in range(shards)])


def snapshot_tables(entry: dict, group: int) -> list[str]:
    """The files of one table of a snapshot: one per shard, each holding the rows its worker owns."""
    return _listed(entry, [f"{entry['path']}/{shard_file(f'table-{group}.arrow', shard, entry['shards'])}"
                           for shard in range(entry["shards"])])


def _sparse_schema(width: int) -> pa.Schema:
    return pa.schema([("group", pa.int16()), ("fid", pa.int64()), ("removed", pa.bool_()),
                      ("weights", pa.list_(pa.float32(), width)), ("last_seen_ms", pa.int64())])


def read_sparse_delta(path: Path) -> list[tuple[int, torch.Tensor, RowBatch]]:
    """[(group, removed fids, updated rows without optimizer state)] of a sparse delta file."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ModelDirError(f"{path.name}: unreadable sparse delta ({exc})") from exc
    groups = table.column("group").to_numpy()
    removed = table.column("removed").to_numpy(zero_copy_only=False)
    fids = table.column("fid").to_numpy()
    width = table.schema.field("weights").type.list_size
    out = []
    for group in np.unique(groups):
        mine = groups == group
        gone, kept = mine & removed, mine & ~removed
        weights = table.column("weights").filter(pa.array(kept)).combine_chunks()
        values = weights.values.to_numpy(zero_copy_only=False).reshape(-1, width) if len(weights) else \
            np.zeros((0, width), np.float32)
        rows = RowBatch(fids=torch.from_numpy(fids[kept].copy()), embeddings=torch.from_numpy(values.copy()),
                        state=torch.zeros(int(kept.sum()), 0),
                        last_seen_ms=torch.from_numpy(table.column("last_seen_ms").to_numpy()[kept].copy()),
                        counts=torch.zeros(int(kept.sum()), dtype=torch.int32))
        out.append((int(group), torch.from_numpy(fids[gone].copy()), rows))
    return out


@dataclass
class Position:
    """The last example trained: its (impression time, request id, item id) - the total order
    in which the trainer consumes examples - and how many examples were trained."""

    impression_time_ms: int = -END_OF_TIME_MS
    request_id: str = ""
    item_id: str = ""
    examples: int = 0

    def key(self) -> tuple:
        return (self.impression_time_ms, self.request_id, self.item_id)


class Publisher:
    """Publishes ``trainer``'s state to ``model_dir`` on the schedule of its spec."""

    def __init__(self, trainer, model_dir: str | Path, clock: str = "event",
                 now_ms: Callable[[], int] | None = None):
        if clock not in ("event", "processing"):
            raise ValueError(f"clock must be 'event' or 'processing', got {clock!r}")
        self.trainer, self.dir, self.clock = trainer, Path(model_dir), clock
        self._now = now_ms or (lambda: int(time.time() * 1000))
        self.comm = trainer.comm  # a sharded trainer's workers (trainer.sharded), or None
        self.shard, self.shards = (0, 1) if self.comm is None else (self.comm.rank, self.comm.world)
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.dir / SPEC_FILE
        if self.shard == 0 and not spec_path.is_file():
            with atomic_write(spec_path, "w") as out:
                out.write(spec_to_json(trainer.spec))
        self.entries = read_manifest(self.dir)
        self.version = self.entries[-1]["version"] if self.entries else 0
        self.last = {"sparse": None, "dense": None, "snapshot": None}
        self.published_bytes: dict[str, int] = {}

    def now(self) -> int:
        return self.trainer.data_time_ms if self.clock == "event" else self._now()

    # -- schedule -----------------------------------------------------------------------------

    def after_batch(self, position: Position) -> list[dict]:
        """Publish what is due after a trained batch; returns the new entries."""
        now, spec, new = self.now(), self.trainer.spec, []
        if self.last["snapshot"] is None or now - self.last["snapshot"] >= spec.snapshot.every_ms:
            return [self.publish_snapshot(position)]
        if now - self.last["dense"] >= spec.publish.dense_every_ms:
            new.append(self.publish_dense())
        if now - self.last["sparse"] >= spec.publish.sparse_every_ms:
            new.append(self.publish_sparse())
        return new

    def finish(self, position: Position) -> list[dict]:
        """At the end of a run: the last rows and weights, then a snapshot to resume from."""
        return [self.publish_sparse(), self.publish_dense(), self.publish_snapshot(position)]

    # -- versions -----------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self.comm is not None:
            self.comm.barrier()

    def _commit(self, kind: str, path: str, files: list[str]) -> dict:
        """Name a version in the manifest once every shard has written its part of ``files``
        (the names of all parts: every worker passes the same list)."""
        self._barrier()
        entry = {"version": self.version + 1, "kind": kind, "path": path, "base_version": self.version,
                 "data_time_ms": int(self.trainer.data_time_ms), "published_at": time.time(),
                 "shards": self.shards,
                 "sha256": {name: file_sha256(self.dir / name) for name in files} if self.shard == 0 else {}}
        self.entries.append(entry)
        pruned_below = self._retain() if kind == "snapshot" else None
        if self.shard == 0:
            with atomic_write(self.dir / MANIFEST, "w") as out:
                json.dump({"versions": self.entries}, out, indent=1)
            if pruned_below is not None:  # (after the manifest: it never names a missing file)
                self._remove_versions_below(pruned_below)
        self.version += 1
        for due in (self.last if kind == "snapshot" else [kind]):  # a snapshot holds the rows and weights too
            self.last[due] = self.now()
        self.published_bytes[kind] = sum((self.dir / name).stat().st_size for name in files)
        return entry

    def _part(self, name: str, shard: int) -> str:
        return shard_file(name, shard, self.shards)

    def publish_sparse(self) -> dict:
        name = self._part(f"v{self.version + 1:06d}-sparse.arrow", self.shard)
        parts = []
        for index, group in enumerate(self.trainer.groups):
            delta = group.table.take_delta()
            width = group.table.dim
            updated, removed = delta.updated, delta.removed.cpu()
            n, r = len(updated), len(removed)
            weights = updated.embeddings.detach().cpu().numpy().astype(np.float32).reshape(-1)
            parts.append(pa.table({
                "group": pa.array(np.full(n + r, index, np.int16)),
                "fid": pa.array(np.concatenate([updated.fids.cpu().numpy(), removed.numpy()]).astype(np.int64)),
                "removed": pa.array(np.r_[np.zeros(n, bool), np.ones(r, bool)]),
                "weights": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.r_[weights, np.zeros(r * width, np.float32)]), width),
                "last_seen_ms": pa.array(np.r_[updated.last_seen_ms.cpu().numpy(), np.zeros(r, np.int64)]),
            }, schema=_sparse_schema(width)))
        widths = {p.schema.field("weights").type.list_size for p in parts}
        if len(widths) > 1:  # groups of different dims: pad to the widest
            raise NotImplementedError("sparse deltas need one row width across optimizer groups")
        table = pa.concat_tables(parts)
        with atomic_write(self.dir / name) as out, pa.ipc.new_file(out, table.schema) as writer:
            writer.write_table(table)
        first = f"v{self.version + 1:06d}-sparse.arrow"
        return self._commit("sparse", self._part(first, 0), [self._part(first, s) for s in range(self.shards)])

    def publish_dense(self) -> dict:
        name = f"v{self.version + 1:06d}-dense.pt"
        if self.shard == 0:  # (the dense weights are the same on every worker)
            buffer = io.BytesIO()
            torch.save({k: v.cpu() for k, v in self.trainer.model.state_dict().items()}, buffer)
            with atomic_write(self.dir / name) as out:
                out.write(buffer.getvalue())
        return self._commit("dense", name, [name])

    def publish_snapshot(self, position: Position) -> dict:
        name = f"v{self.version + 1:06d}-snapshot"
        staging = self.dir / f".{name}.tmp"
        if self.shard == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        self._barrier()  # (the staging directory exists for every shard)
        files = []
        for index, group in enumerate(self.trainer.groups):
            table = f"table-{index}.arrow"
            save_table(group.table, staging / self._part(table, self.shard))
            files += [f"{name}/{self._part(table, shard)}" for shard in range(self.shards)]
        state = self.trainer.training_state()  # (collective-free: every worker computes it)
        if self.shard == 0:
            state["position"] = position.__dict__.copy()
            state["rng"] = torch.get_rng_state()
            torch.save(state, staging / "state.pt")
        files.append(f"{name}/state.pt")
        self._barrier()  # every shard's tables are written
        if self.shard == 0:
            os.replace(staging, self.dir / name)  # the whole directory appears at once
        for group in self.trainer.groups:  # a reader at this version has every row: the next delta starts here
            group.table.reset_delta()
        return self._commit("snapshot", name, files)

    def _retain(self) -> int | None:
        """Retention (``snapshot.keep``): once there are more snapshots than that, every version
        before the oldest kept one leaves ``entries``; returns that oldest kept version (None:
        nothing pruned). ``_commit`` then writes the manifest and removes the pruned versions'
        files. A reader that held a pruned version jumps to the newest snapshot (``serving.model``)."""
        keep = self.trainer.spec.snapshot.keep
        snapshots = [entry["version"] for entry in self.entries if entry["kind"] == "snapshot"]
        if keep is None or len(snapshots) <= keep:
            return None
        first = snapshots[-keep]
        self.entries = [entry for entry in self.entries if entry["version"] >= first]
        return first

    def _remove_versions_below(self, first: int) -> None:
        """Every version-named file or snapshot directory before version ``first`` (a crash's
        leftovers from before it too)."""
        for path in self.dir.iterdir():
            match = _VERSION_FILE.match(path.name)
            if not match or int(match.group(1)) >= first:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def newest_snapshot(entries: list[dict]) -> dict | None:
    snapshots = [e for e in entries if e["kind"] == "snapshot"]
    return snapshots[-1] if snapshots else None


def restore_trainer(trainer, model_dir: str | Path) -> tuple[Position, dict]:
    """Load the newest snapshot of ``model_dir`` into ``trainer`` (tables with optimizer state,
    dense weights and optimizer, metrics); returns the position it reached and its entry."""
    model_dir = Path(model_dir)
    entry = newest_snapshot(read_manifest(model_dir))
    if entry is None:
        raise ModelDirError(f"{model_dir}: no snapshot to resume from")
    verify(model_dir, entry)
    comm = trainer.comm
    shard, shards = (0, 1) if comm is None else (comm.rank, comm.world)
    if entry["shards"] != shards:
        raise ModelDirError(f"version {entry['version']} (snapshot) was trained by {entry['shards']} worker(s): "
                            f"resume it with as many, not {shards}")
    for index, group in enumerate(trainer.groups):
        store = group.table.store  # with an external store the snapshot holds the cache; the store the rest
        cached = {} if store is None else {"max_rows": group.table.config.max_rows}
        loaded = load_table(model_dir / snapshot_tables(entry, index)[shard], store=store,
                            device=str(trainer.device), **cached)
        group.table = loaded
    state = load_tensors(model_dir / entry["path"] / "state.pt", f"version {entry['version']} (snapshot)",
                         trainer.device)
    trainer.load_training_state(state)
    torch.set_rng_state(state["rng"])
    return Position(**state["position"]), entry
