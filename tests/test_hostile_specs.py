"""Hostile and clumsy specs: each is refused at load time with an error naming the field or the
file, never a memory blow-up, an overflow deep in training or a bare traceback."""
from __future__ import annotations

import copy
import time

import pytest

from schemas.spec import load_spec, parse_spec
from schemas.spec_types import SpecError

BASE = {"name": "t", "events": {"impression": "movielens_impression", "action": "action"},
        "defaults": {"dim": 8},
        "slots": [{"name": "user", "source": "user_id"},
                  {"name": "age", "source": "age", "kind": "bucketized", "boundaries": [18, 30, 50]}],
        "dense": [{"name": "age", "source": "age", "normalization": "standard", "mean": 30, "std": 10}],
        "labels": {"actions": ["like"]}, "join": {"window": "30m"}}


def _errors(mutate) -> str:
    raw = copy.deepcopy(BASE)
    mutate(raw)
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return "\n".join(info.value.errors)


def test_a_billion_laughs_is_refused_at_once(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 400
    started = time.monotonic()
    with pytest.raises(SpecError, match="once aliases are expanded"):
        load_spec(path)
    assert time.monotonic() - started < 5  # a correctness bound: it must not expand 9^9 nodes


def test_a_spec_that_refers_to_itself_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("name: &n [*n]\n")
    with pytest.raises(SpecError, match="bomb|loop|nested deeper|not valid YAML"):
        load_spec(path)


def test_a_non_utf8_spec_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="(?s)latin1.yaml.*not UTF-8"):
        load_spec(path)


def test_an_oversized_spec_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(SpecError, match="a spec is at most"):
        load_spec(path)


@pytest.mark.parametrize("dim", [10 ** 9, 10 ** 32])
def test_huge_dims_are_refused(dim):
    assert "defaults.dim" in _errors(lambda raw: raw["defaults"].update(dim=dim))
    assert "slot 'user': dim must be at most 4096" in _errors(lambda raw: raw["slots"][0].update(dim=dim))


def test_huge_sizes_are_refused():
    assert "model.hidden_units" in _errors(lambda raw: raw.update(model={"hidden_units": [10 ** 9]}))
    assert "join.window" in _errors(lambda raw: raw["join"].update(window="100000000000w"))
    assert "training.batch_size" in _errors(lambda raw: raw.update(training={"batch_size": 10 ** 12}))


@pytest.mark.parametrize("field, value", [("mean", float("nan")), ("std", float("inf")), ("mean", float("-inf"))])
def test_non_finite_normalisation_is_refused_by_name(field, value):
    assert f": {field}: must be a finite number" in _errors(lambda raw: raw["dense"][0].update({field: value}))


def test_nan_bucket_boundaries_are_refused():
    assert "finite numbers as 'boundaries'" in _errors(
        lambda raw: raw["slots"][1].update(boundaries=[18, float("nan"), 50]))


def test_the_bounds_leave_real_specs_alone():
    for name in ("movielens", "obd", "synthetic"):
        load_spec(name)
