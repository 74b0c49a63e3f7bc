"""Closed impressions -> sampled, feature-extracted Examples (the Example Avro schema, as Arrow).

The one place where join output becomes training data; the Beam and Flink adapters and the
plain-Python loop all call it on batches. Everything is columnar: label times arrive as an
``[n, actions]`` matrix (-1: no such action), sampling and feature extraction run per column.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from schemas.dead_letters import DeadLetter
from schemas.events import arrow_schema, load_schema
from schemas.spec_types import FeatureSpec
from transforms.batch_join import ClosedImpressions
from transforms.features import FeatureExtractor
from transforms.join import Joined
from transforms.keys import join_keys
from transforms.sampling import NegativeSampler

EXAMPLE_SCHEMA = arrow_schema(load_schema("example"))


class ExampleBuilder:
    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.actions = list(spec.labels.actions)
        self.target_column = self.actions.index(spec.labels.target)
        self.extractor = FeatureExtractor(spec)
        self.sampler = NegativeSampler(spec.sampling.negative_rate, spec.sampling.seed)

    def build(self, joined: list[Joined]) -> tuple[pa.Table, list[DeadLetter]]:
        """``Joined.impression`` holds the impression record (a dict), as the Beam job passes it."""
        if not joined:
            return EXAMPLE_SCHEMA.empty_table(), []
        label_times = np.array([[j.label_times_ms.get(a, -1) for a in self.actions] for j in joined], np.int64)
        impressions = self.extractor.table_from_records([j.impression for j in joined])
        times = np.array([j.impression_time_ms for j in joined], np.int64)
        return self.build_columns(impressions, times, label_times)

    def build_closed(self, impressions: pa.Table, closed: ClosedImpressions) -> tuple[pa.Table, list[DeadLetter]]:
        """``closed.refs`` are row numbers of ``impressions`` (the columnar join's output)."""
        if len(closed) == 0:
            return EXAMPLE_SCHEMA.empty_table(), []
        return self.build_columns(impressions.take(pa.array(closed.refs)), closed.times, closed.label_times)

    def build_pending(self, pending: pa.Table, closed: ClosedImpressions
                      ) -> tuple[pa.Table, list[DeadLetter], pa.Table]:
        """Streaming form: ``pending`` holds the open impressions with a ``_ref`` column and
        ``closed.refs`` are such refs. Returns the Examples and dead letters of the closed ones
        and the impressions still open."""
        import pyarrow.compute as pc

        rows = pc.index_in(pa.array(closed.refs), value_set=pending.column("_ref"))
        table, letters = self.build_columns(pending.take(rows).drop_columns(["_ref"]), closed.times,
                                            closed.label_times)
        still_open = pending.filter(pc.invert(pc.is_in(pending.column("_ref"), value_set=pa.array(closed.refs))))
        return table, letters, still_open

    def build_columns(self, impressions: pa.Table, times: np.ndarray,
                      label_times: np.ndarray) -> tuple[pa.Table, list[DeadLetter]]:
        """Impressions with their label-time matrix -> Examples (negatives sampled) and dead letters."""
        keys = join_keys(impressions.column("request_id"), impressions.column("item_id"))
        keep, rates = self.sampler.decide_many(keys, label_times[:, self.target_column] >= 0)
        if not keep.all():
            rows = pa.array(np.flatnonzero(keep))
            impressions, times, label_times, rates = impressions.take(rows), times[keep], label_times[keep], rates[keep]
        fids, dense, extracted, letters = self.extractor.extract(impressions)
        if not extracted.all():
            rows = pa.array(np.flatnonzero(extracted))
            impressions, times, label_times, rates = (impressions.take(rows), times[extracted],
                                                      label_times[extracted], rates[extracted])
        columns = {
            "request_id": impressions.column("request_id"),
            "user_id": impressions.column("user_id"),
            "item_id": impressions.column("item_id"),
            "impression_time_ms": pa.array(times, pa.int64()),
            "position": impressions.column("position"),
            "labels": self._label_map(label_times >= 0, None),
            "label_times_ms": self._label_map(label_times >= 0, label_times),
            "sample_rate": pa.array(rates, pa.float64()),
            "fids": fids,
            "dense": dense.cast(EXAMPLE_SCHEMA.field("dense").type),
        }
        return pa.table(columns, schema=EXAMPLE_SCHEMA), letters

    def _label_map(self, present: np.ndarray, label_times: np.ndarray | None) -> pa.MapArray:
        """labels: every action -> 0/1; label_times_ms (given times): only the actions present."""
        n, k = present.shape
        names = np.array(self.actions, dtype=object)
        if label_times is None:
            field = EXAMPLE_SCHEMA.field("labels").type
            offsets = np.arange(0, n * k + 1, k, dtype=np.int32)
            keys, items = np.tile(names, n), pa.array(present.reshape(-1).astype(np.int32))
        else:
            field = EXAMPLE_SCHEMA.field("label_times_ms").type
            offsets = np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int32)
            keys, items = np.tile(names, n)[present.reshape(-1)], pa.array(label_times[present], pa.int64())
        return pa.MapArray.from_arrays(pa.array(offsets), pa.array(keys, pa.string()), items, type=field)
