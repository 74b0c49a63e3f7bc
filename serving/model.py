"""The serving model: the newest snapshot plus the deltas after it, applied in version order.

Serving tables hold the embedding and wide weight of each fid only (no optimizer state; fp16 on
request). Prediction runs the trainer's own model (``trainer.ranking_model.RankingModel``, with
tables that hold no optimizer state) on the features that the trainer's ``FeatureExtractor`` makes from raw impressions, so a served
probability is the trainer's: ``sigmoid(logit)``, the logit already calibrated to unsampled
traffic by the log-odds correction in training.

A version that cannot be applied - corrupt or missing file, a ``base_version`` other than the
version in hand - is refused with ``ModelDirError``; the model keeps answering with the last good
version and reports the error in ``status()``.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from schemas.events import load_schema
from schemas.fids import HASH_BITS
from schemas.records import conform_records
from trainer.embedding_table import EmbeddingTable
from trainer.publish import (
    ModelDirError,
    load_tensors,
    newest_snapshot,
    read_manifest,
    read_sparse_delta,
    read_spec,
    snapshot_tables,
    sparse_parts,
    verify,
)
from trainer.ranking_model import RankingModel, table_configs
from trainer.table_snapshot import read_rows
from transforms.features import FeatureExtractor


class BadRequest(ValueError):
    """A prediction request that cannot be served (names the record and field)."""


class ServingModel:
    def __init__(self, model_dir: str | Path, device: str = "cpu", fp16: bool = False, store: str | None = None):
        """``store``: the trainer's ``redis://`` store, read on a miss (optional). A trainer with
        an external store snapshots only its cache; the rows it had evicted are in the store.
        Rows read through may be newer than the version served (the store holds what the trainer
        last wrote back); they are kept, and later versions overwrite them."""
        self.dir, self.device, self.fp16 = Path(model_dir), device, fp16
        self.spec = read_spec(self.dir)
        self.stores = self._stores(store) if store else None
        self.read_through_rows = 0
        self.extractor = FeatureExtractor(self.spec)
        self.schema = load_schema(self.spec.events.impression)  # requests are checked as log records
        self.model: RankingModel | None = None
        self.version = 0
        self.data_time_ms = 0
        self.applied: list[int] = []
        self.last_error: str | None = None
        self.trainer_published_at = 0.0
        self.applied_published_at = 0.0
        self.lock = threading.Lock()

    # -- versions -----------------------------------------------------------------------------

    def refresh(self, until_version: int | None = None, entries: list[dict] | None = None) -> list[int]:
        """Apply every new version in order (up to ``until_version``: serving as it stood then);
        returns the versions applied. ``entries``: the manifest, read already (default: read it
        now). A version that cannot be applied is named in ``last_error``; serving keeps the
        last good one, or jumps to a newer snapshot if there is one (a damaged delta does not
        hold serving back for good)."""
        entries = read_manifest(self.dir) if entries is None else entries
        if until_version is not None:
            entries = [entry for entry in entries if entry["version"] <= until_version]
        if entries:
            self.trainer_published_at = entries[-1]["published_at"]
        applied, skipped = [], None
        while True:
            failing = {"version": self.version + 1}
            try:
                self._apply_new(entries, applied, failing)
                self.last_error = skipped
                return applied
            except Exception as exc:  # any version that cannot be applied is refused, never fatal
                error = str(exc) if isinstance(exc, (ModelDirError, OSError)) else \
                    f"version {failing['version']} could not be applied: {type(exc).__name__}: {exc}"
            newer = [e for e in entries if e["kind"] == "snapshot" and e["version"] > failing["version"]]
            if newer:
                try:
                    self._load_snapshot(newer[-1])
                    applied.append(newer[-1]["version"])
                    skipped = f"{error}; skipped to snapshot version {newer[-1]['version']}"
                    entries = [e for e in entries if e["version"] > newer[-1]["version"]]
                    continue
                except Exception as exc:
                    error = f"{error}; the newer snapshot {newer[-1]['version']} failed too: {exc}"
            self.last_error = error
            if not applied:
                raise ModelDirError(error)
            return applied

    def _apply_new(self, entries: list[dict], applied: list[int], failing: dict) -> None:
        pruned = self.model is not None and entries and entries[0]["version"] > self.version + 1
        if self.model is None or pruned:  # (pruned: the versions after ours left with retention, snapshot.keep)
            snapshot = newest_snapshot(entries)
            if snapshot is None:
                raise ModelDirError(f"{self.dir}: no snapshot published yet")
            failing["version"] = snapshot["version"]
            self._load_snapshot(snapshot)
            applied.append(snapshot["version"])
        for entry in entries:
            if entry["version"] <= self.version:
                continue
            failing["version"] = entry["version"]
            if entry["base_version"] != self.version:
                raise ModelDirError(f"version {entry['version']} ({entry['kind']}) applies on top of "
                                    f"{entry['base_version']}, but serving holds {self.version}: out of order")
            verify(self.dir, entry)
            self._apply(entry)
            applied.append(entry["version"])

    def _stores(self, uri: str) -> list:
        """One ``RedisStore`` per table, named and shaped as the trainer's (rows hold its
        optimizer state, which serving drops)."""
        from trainer.redis_config import RedisStoreConfig
        from trainer.redis_store import RedisStore

        config = RedisStoreConfig.from_uri(uri)
        return [RedisStore(config, table, name=f"{self.spec.name}:g{index}", writer=False)
                for index, table in enumerate(table_configs(self.spec, optimizer_state=True))]

    def _read_through(self, fids: pa.ListArray) -> None:
        """Fetch the request's fids that no version has given us from the store (under the lock)."""
        flat = pc.list_flatten(fids).to_numpy(zero_copy_only=False)  # respects slices, unlike .values
        group_of = self.model.group_of_slot[flat >> HASH_BITS]
        for index, (group, store) in enumerate(zip(self.model.groups, self.stores)):
            unique = torch.unique(torch.from_numpy(flat[group_of == index]))
            missing = unique[group.table.lookup(unique).cpu() < 0]
            if len(missing) == 0:
                continue
            found, rows = store.get_rows(missing)
            if len(rows):
                group.table.put_rows(rows.without_state())
                self.read_through_rows += len(rows)

    def _load_snapshot(self, entry: dict) -> None:
        verify(self.dir, entry)
        model = RankingModel(self.spec, self.device, optimizer_state=False,
                             embedding_dtype="float16" if self.fp16 else "float32")
        for index, group in enumerate(model.groups):
            for part in snapshot_tables(entry, index):  # (one per shard of a sharded trainer)
                rows, _, _ = read_rows(self.dir / part, with_state=False)
                group.table.put_rows(rows)
        state = load_tensors(self.dir / entry["path"] / "state.pt", f"version {entry['version']} (snapshot)",
                             self.device)
        model.net.load_state_dict(state["model"])
        model.net.eval()
        with self.lock:
            self.model = model
            self._applied(entry)

    def _apply(self, entry: dict) -> None:
        path = self.dir / entry["path"]
        if entry["kind"] == "snapshot":
            self._load_snapshot(entry)
            return
        if entry["kind"] == "dense":
            weights = load_tensors(path, f"version {entry['version']} (dense weights)", self.device)
            with self.lock:
                self.model.net.load_state_dict(weights)
                self._applied(entry)
            return
        groups = [group for part in sparse_parts(entry) for group in read_sparse_delta(self.dir / part)]
        with self.lock:
            for index, removed, rows in groups:
                table: EmbeddingTable = self.model.groups[index].table
                if len(removed):
                    table.delete(removed)
                if len(rows):
                    table.put_rows(rows)
            self._applied(entry)

    def _applied(self, entry: dict) -> None:
        self.version = entry["version"]
        self.data_time_ms = max(self.data_time_ms, entry["data_time_ms"])
        self.applied_published_at = entry["published_at"]
        self.applied.append(entry["version"])

    # -- prediction ---------------------------------------------------------------------------

    def features(self, records: list[dict]):
        """Fids and dense values of raw impressions, checked exactly as the log readers check a
        record (``schemas.records.conform``: defaults filled, every type checked, no coercion); a
        misfit is refused naming the record and field."""
        if not isinstance(records, list) or not records:
            raise BadRequest("'impressions' must be a non-empty list of impression records (JSON objects)")
        try:
            fitted = conform_records(records, self.schema)
        except ValueError as exc:
            raise BadRequest(f"impression {str(exc).removeprefix('record ')} (schema {self.spec.events.impression!r})"
                             ) from None
        table = self.extractor.table_from_records(fitted)
        fids, dense, kept, letters = self.extractor.extract(table)
        if not kept.all():
            raise BadRequest("; ".join(letter.detail for letter in letters[:5]) or "features could not be extracted")
        return fids, dense

    def predict(self, records: list[dict]) -> tuple[np.ndarray, int]:
        """Probabilities (log-odds corrected for the sampling rate) and the version that made them."""
        fids, dense = self.features(records)
        with self.lock:
            if self.model is None:
                raise ModelDirError("no model loaded yet")
            if self.stores is not None:
                self._read_through(fids)
            logits = self.model.predict_features(fids, dense)
            version = self.version
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), version

    def status(self) -> dict:
        return {"version": self.version, "data_time_ms": self.data_time_ms,
                "seconds_behind_trainer": round(max(0.0, self.trainer_published_at - self.applied_published_at), 3),
                "seconds_since_applied": round(time.time() - self.applied_published_at, 3) if self.version else None,
                "applied_versions": len(self.applied), "last_error": self.last_error, "fp16": self.fp16,
                "read_through_rows": self.read_through_rows if self.stores is not None else None}
