"""Open Bandit Dataset (ZOZOTOWN, CC BY 4.0) as impression and action logs.

Each row of ``obd/<policy>/<campaign>/<campaign>.csv`` is an impression at its timestamp with
the item, its position and four hashed user features; the item's features come from
``item_context.csv``. The log has no click time, so a click becomes a ``click`` action after a
random delay drawn from an exponential distribution with mean ``CLICK_DELAY_MEAN_S`` seconds
(``numpy.random.default_rng(seed)``, in row order). OBD has no user id either: ``user_id`` is a
digest of the four user features (one id per user profile).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from event_datasets.fetch import package_files
from schemas.events import load_schema
from schemas.log_writer import write_event_logs
from schemas.logs import HOUR_MS

REQUIREMENT = "obp==0.5.7"
POLICIES = ("random", "bts")
CAMPAIGNS = ("all", "men", "women")
CLICK_DELAY_MEAN_S = 30.0


def source_files(policy: str, campaign: str) -> dict[str, Path]:
    if policy not in POLICIES:
        raise ValueError(f"OBD policy must be one of {POLICIES}, got {policy!r}")
    if campaign not in CAMPAIGNS:
        raise ValueError(f"OBD campaign must be one of {CAMPAIGNS}, got {campaign!r}")
    base = f"obp/dataset/obd/{policy}/{campaign}"
    members = {"log": f"{base}/{campaign}.csv", "items": f"{base}/item_context.csv"}
    files = package_files(REQUIREMENT, list(members.values()), sdist=True)
    return {key: files[member] for key, member in members.items()}


def _profile_id(*features: str) -> str:
    return hashlib.blake2b("|".join(features).encode(), digest_size=8).hexdigest()


def build_tables(files: dict[str, Path], policy: str, campaign: str, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(impressions, actions) as Arrow tables in the obd_impression / action schemas."""
    log = pa_csv.read_csv(files["log"])
    items = pa_csv.read_csv(files["items"])
    n = log.num_rows
    times_ns = pc.cast(log.column("timestamp"), pa.timestamp("ns", tz="UTC")).cast(pa.int64()).to_numpy()
    times = times_ns // 1_000_000  # ms, truncating the microseconds
    order = np.argsort(times, kind="stable")
    log = log.take(pa.array(order))
    times = times[order]
    row_index = pa.array(order).cast(pa.string())
    request_ids = pc.binary_join_element_wise(f"obd-{policy}-{campaign}-", row_index, "")
    item_ids = log.column("item_id").cast(pa.string())
    user_features = [log.column(f"user_feature_{k}").cast(pa.string()) for k in range(4)]
    user_ids = pa.array([_profile_id(*row) for row in zip(*(f.to_pylist() for f in user_features))])
    item_row = {iid: i for i, iid in enumerate(items.column("item_id").to_pylist())}
    i_idx = pa.array([item_row[i] for i in log.column("item_id").to_pylist()])

    columns = {
        "request_id": request_ids,
        "user_id": user_ids,
        "item_id": item_ids,
        "event_time_ms": pa.array(times),
        "position": log.column("position").cast(pa.int32()),
        "propensity_score": log.column("propensity_score").cast(pa.float64()),
    }
    for k in range(4):
        columns[f"user_feature_{k}"] = user_features[k]
    columns["item_feature_0"] = items.column("item_feature_0").cast(pa.float64()).take(i_idx)
    for k in (1, 2, 3):
        columns[f"item_feature_{k}"] = items.column(f"item_feature_{k}").cast(pa.string()).take(i_idx)
    impressions = pa.table(columns)

    rng = np.random.default_rng(seed)
    delay_ms = np.round(rng.exponential(CLICK_DELAY_MEAN_S, size=n) * 1000).astype(np.int64)
    clicked = np.flatnonzero(log.column("click").to_numpy() == 1)
    take = pa.array(clicked)
    actions = pa.table({
        "request_id": request_ids.take(take),
        "item_id": item_ids.take(take),
        "user_id": user_ids.take(take),
        "action_type": pa.array(["click"] * len(clicked), type=pa.string()),
        "event_time_ms": pa.array(times[clicked] + delay_ms[clicked]),
        "value": pa.array(np.ones(len(clicked))),
    })
    return impressions, actions


def convert(out_dir: str | Path, policy: str = "random", campaign: str = "all", seed: int = 0,
            fmt: str = "avro") -> dict:
    """Write one OBD (policy, campaign) log under ``out_dir``; returns the manifest."""
    impressions, actions = build_tables(source_files(policy, campaign), policy, campaign, seed)
    return write_event_logs(
        out_dir, impressions, actions, load_schema("obd_impression"), load_schema("action"), fmt, HOUR_MS,
        dataset=f"open-bandit-dataset/{policy}/{campaign}", source=REQUIREMENT, spec="obd", seed=seed,
        action_delay=f"exponential, mean {CLICK_DELAY_MEAN_S:g} s")
