"""Joined impressions -> sampled, feature-extracted Examples (the Example Avro schema, as Arrow).

``ExampleBuilder.build`` is the one place where join output becomes training data; the Beam and
Flink adapters and the plain-Python loop all call it on batches.
"""
from __future__ import annotations

import pyarrow as pa

from schemas.dead_letters import DeadLetter
from schemas.events import arrow_schema, load_schema
from schemas.spec import FeatureSpec
from transforms.features import FeatureExtractor
from transforms.join import Joined
from transforms.sampling import NegativeSampler

EXAMPLE_SCHEMA = arrow_schema(load_schema("example"))


class ExampleBuilder:
    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.extractor = FeatureExtractor(spec)
        self.sampler = NegativeSampler(spec.sampling.negative_rate, spec.sampling.seed)
        self.target = spec.labels.target

    def build(self, joined: list[Joined]) -> tuple[pa.Table, list[DeadLetter]]:
        """Sample negatives, extract features; ``Joined.impression`` must be the impression record (dict)."""
        kept, rates = [], []
        for item in joined:
            record = item.impression
            keep, rate = self.sampler.decide(record["request_id"], record["item_id"], item.labels[self.target] == 1)
            if keep:
                kept.append(item)
                rates.append(rate)
        if not kept:
            return EXAMPLE_SCHEMA.empty_table(), []
        impressions = self.extractor.table_from_records([item.impression for item in kept])
        fids, dense, keep_rows, letters = self.extractor.extract(impressions)
        rows = [i for i, k in enumerate(keep_rows) if k]
        columns = {
            "request_id": impressions.column("request_id").take(rows),
            "user_id": impressions.column("user_id").take(rows),
            "item_id": impressions.column("item_id").take(rows),
            "impression_time_ms": pa.array([kept[i].impression_time_ms for i in rows], pa.int64()),
            "position": impressions.column("position").take(rows),
            "labels": pa.array([list(kept[i].labels.items()) for i in rows], EXAMPLE_SCHEMA.field("labels").type),
            "label_times_ms": pa.array([list(kept[i].label_times_ms.items()) for i in rows],
                                       EXAMPLE_SCHEMA.field("label_times_ms").type),
            "sample_rate": pa.array([rates[i] for i in rows], pa.float64()),
            "fids": fids,
            "dense": dense.cast(EXAMPLE_SCHEMA.field("dense").type),
        }
        return pa.table(columns, schema=EXAMPLE_SCHEMA), letters
