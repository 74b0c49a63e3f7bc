"""Shared fixtures: real logs converted once per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def movielens_logs(tmp_path_factory):
    from datasets import movielens

    out = tmp_path_factory.mktemp("movielens")
    manifest = movielens.convert(out, seed=0)
    return out, manifest


@pytest.fixture(scope="session")
def obd_logs(tmp_path_factory):
    from datasets import obd

    out = tmp_path_factory.mktemp("obd")
    manifest = obd.convert(out, seed=0)
    return out, manifest
