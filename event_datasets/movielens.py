"""MovieLens-100K as impression and action logs (one file per day of event time).

Every rating is an impression at the rating's timestamp (the movie was shown to the user); a
rating >= 4 is also a ``like`` action that arrives after a random delay drawn from an
exponential distribution with mean ``LIKE_DELAY_MEAN_S`` seconds (the data set has no separate
action time). Delays are drawn from ``numpy.random.default_rng(seed)`` in rating order, so a
seed reproduces the logs byte for byte.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from event_datasets.fetch import package_files
from schemas.events import load_schema
from schemas.log_writer import write_event_logs
from schemas.logs import DAY_MS

REQUIREMENT = "recbole==1.2.1"
MEMBER_DIR = "recbole/dataset_example/ml-100k"
LIKE_THRESHOLD = 4.0
LIKE_DELAY_MEAN_S = 120.0


def _read_tsv(path: Path) -> pa.Table:
    table = pa_csv.read_csv(
        path,
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pa_csv.ConvertOptions(strings_can_be_null=False, quoted_strings_can_be_null=False),
    )
    return table.rename_columns([name.split(":")[0] for name in table.column_names])


def source_files() -> dict[str, Path]:
    members = [f"{MEMBER_DIR}/ml-100k.{ext}" for ext in ("inter", "user", "item")]
    files = package_files(REQUIREMENT, members)
    return {ext: files[f"{MEMBER_DIR}/ml-100k.{ext}"] for ext in ("inter", "user", "item")}


def build_tables(files: dict[str, Path], seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(impressions, actions) as Arrow tables in the movielens_impression / action schemas."""
    inter = _read_tsv(files["inter"])
    users = _read_tsv(files["user"])
    items = _read_tsv(files["item"])
    n = inter.num_rows
    order = np.argsort(inter.column("timestamp").to_numpy(), kind="stable")
    row_index = np.arange(n)[order]
    inter = inter.take(pa.array(order))

    user_ids = inter.column("user_id").cast(pa.string())
    item_ids = inter.column("item_id").cast(pa.string())
    time_ms = (inter.column("timestamp").to_numpy() * 1000).astype(np.int64)
    request_ids = pc.binary_join_element_wise("ml-", pa.array(row_index).cast(pa.string()), "")

    user_table = {str(u): i for i, u in enumerate(users.column("user_id").to_pylist())}
    item_table = {str(m): i for i, m in enumerate(items.column("item_id").to_pylist())}
    u_idx = pa.array([user_table[u] for u in user_ids.to_pylist()])
    i_idx = pa.array([item_table[m] for m in item_ids.to_pylist()])
    # A few items have no year ("unkonwn", "V" in the source): those become null.
    years = pa.array([int(y) if y.isdigit() else None for y in items.column("release_year").cast(pa.string()).to_pylist()],
                     type=pa.int32())
    genres = pc.split_pattern(items.column("class").cast(pa.string()), " ")
    genres = pa.array([[g for g in gs if g] for gs in genres.to_pylist()], type=pa.list_(pa.string()))

    impressions = pa.table({
        "request_id": request_ids,
        "user_id": user_ids,
        "item_id": item_ids,
        "event_time_ms": pa.array(time_ms),
        "position": pa.array(np.zeros(n, dtype=np.int32)),
        "age": users.column("age").cast(pa.int32()).take(u_idx),
        "gender": users.column("gender").cast(pa.string()).take(u_idx),
        "occupation": users.column("occupation").cast(pa.string()).take(u_idx),
        "zip_code": users.column("zip_code").cast(pa.string()).take(u_idx),
        "release_year": years.cast(pa.int32()).take(i_idx),
        "genres": genres.take(i_idx),
    })

    rng = np.random.default_rng(seed)
    liked = inter.column("rating").to_numpy() >= LIKE_THRESHOLD
    delay_ms = np.round(rng.exponential(LIKE_DELAY_MEAN_S, size=n) * 1000).astype(np.int64)
    like_idx = np.flatnonzero(liked)
    actions = pa.table({
        "request_id": request_ids.take(pa.array(like_idx)),
        "item_id": item_ids.take(pa.array(like_idx)),
        "user_id": user_ids.take(pa.array(like_idx)),
        "action_type": pa.array(["like"] * len(like_idx), type=pa.string()),
        "event_time_ms": pa.array(time_ms[like_idx] + delay_ms[like_idx]),
        "value": pa.array(inter.column("rating").to_numpy()[like_idx].astype(np.float64)),
    })
    return impressions, actions


def convert(out_dir: str | Path, seed: int = 0, fmt: str = "avro") -> dict:
    """Write MovieLens-100K logs under ``out_dir``; returns the manifest."""
    impressions, actions = build_tables(source_files(), seed)
    return write_event_logs(
        out_dir, impressions, actions, load_schema("movielens_impression"), load_schema("action"), fmt, DAY_MS,
        dataset="movielens-100k", source=REQUIREMENT, spec="movielens", seed=seed,
        like_rule=f"rating >= {LIKE_THRESHOLD:g}", action_delay=f"exponential, mean {LIKE_DELAY_MEAN_S:g} s")
