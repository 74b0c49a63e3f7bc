"""Shared fixtures: real logs converted once per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def movielens_logs(tmp_path_factory):
    from event_datasets import movielens

    out = tmp_path_factory.mktemp("movielens")
    manifest = movielens.convert(out, seed=0)
    return out, manifest


@pytest.fixture(scope="session")
def obd_logs(tmp_path_factory):
    from event_datasets import obd

    out = tmp_path_factory.mktemp("obd")
    manifest = obd.convert(out, seed=0)
    return out, manifest


@pytest.fixture(scope="session")
def movielens_ordered_examples(movielens_logs, tmp_path_factory):
    """The first 16,000 MovieLens Examples in the trainer's order (backfill join on Beam)."""
    import pyarrow.parquet as pq

    from runners.beam_runner import run_job
    from runners.options import JobOptions
    from schemas.spec import load_spec
    from trainer.running import ORDER

    logs, _ = movielens_logs
    out = tmp_path_factory.mktemp("ml-examples")
    run_job(load_spec("movielens"), JobOptions(out=out, logs=logs))
    return pq.read_table(out / "examples").sort_by(ORDER).slice(0, 16_000)


def without_checksums(log_dir) -> None:
    """Drop the manifest's per-file sha256 (logs as a writer without checksums leaves them), so a
    test that damages a file exercises the readers' record-level handling of the damage."""
    import json
    from pathlib import Path

    path = Path(log_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("sha256", None)
    path.write_text(json.dumps(manifest))
