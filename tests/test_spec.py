"""Feature specs: the shipped specs load; every validation error names the slot/field and value."""
import copy
import json

import pytest
import yaml

from runners.cli import main
from schemas.durations import parse_duration_ms
from schemas.fids import MAX_SLOT_ID, make_fid, slot_of
from schemas.spec import builtin_spec_names, load_spec, parse_spec, spec_path
from schemas.spec_types import OptimizerKind, SlotKind, SpecError

BASE = {
    "name": "test",
    "events": {"impression": "movielens_impression", "action": "action"},
    "defaults": {"dim": 8, "expire_after": "7d"},
    "slots": [
        {"name": "user", "source": "user_id"},
        {"name": "item", "source": "item_id", "min_count": 3, "optimizer": {"kind": "adam", "lr": 0.01}},
        {"name": "genres", "source": "genres", "kind": "multi_valued"},
        {"name": "age", "source": "age", "kind": "bucketized", "boundaries": [18, 30, 50]},
        {"name": "user_x_item", "kind": "cross", "cross": ["user", "item"]},
    ],
    "dense": [{"name": "age", "source": "age", "normalization": "standard", "mean": 30, "std": 10}],
    "labels": {"actions": ["like", "click"], "target": "like"},
    "join": {"window": "30m"},
    "sampling": {"negative_rate": 0.5, "seed": 3},
}


def _errors(raw) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return info.value.errors


def _with(mutate):
    raw = copy.deepcopy(BASE)
    mutate(raw)
    return raw


def test_builtin_specs_load():
    assert {"movielens", "obd", "synthetic"} <= set(builtin_spec_names())
    for name in builtin_spec_names():
        spec = load_spec(name)
        assert spec.slots and spec.labels.target in spec.labels.actions


def test_spec_parses_into_typed_values():
    spec = parse_spec(BASE)
    item = spec.slot("item")
    assert item.slot_id == 2 and item.min_count == 3 and item.dim == 8
    assert item.optimizer.kind is OptimizerKind.ADAM and item.optimizer.lr == 0.01
    assert item.expire_after_ms == 7 * 86_400_000
    assert spec.slot("genres").kind is SlotKind.MULTI_VALUED
    assert spec.slot("age").boundaries == (18.0, 30.0, 50.0)
    assert spec.slot("user_x_item").source == ("user", "item")
    assert spec.join.window_ms == 1_800_000
    # dim 8, adam state (2 floats per dim): 4 * 8 * 3 + 20 bytes of key, time and count
    assert item.bytes_per_row == 4 * 8 * 3 + 20


def test_unknown_source_field_is_named():
    errors = _errors(_with(lambda r: r["slots"][0].update(source="user_name")))
    assert any("slot 'user'" in e and "'user_name'" in e and "not in the impression schema" in e for e in errors)


def test_unknown_dense_field_is_named():
    errors = _errors(_with(lambda r: r["dense"][0].update(source="height")))
    assert any("dense feature 'age'" in e and "'height'" in e for e in errors)


def test_unknown_slot_in_a_cross_is_named():
    errors = _errors(_with(lambda r: r["slots"][4].update(cross=["user", "country"])))
    assert errors == ["slot 'user_x_item': crosses unknown slot 'country'"]


def test_duplicate_slot_name():
    errors = _errors(_with(lambda r: r["slots"].append({"name": "user", "source": "user_id"})))
    assert errors == ["slot 'user': duplicate slot name"]


@pytest.mark.parametrize("dim", [0, -4, 2.5])
def test_dim_must_be_positive_integer(dim):
    errors = _errors(_with(lambda r: r["slots"][1].update(dim=dim)))
    assert errors == [f"slot 'item': dim must be an integer > 0, got {dim!r}"]


@pytest.mark.parametrize("duration", ["30", "5 parsecs", "-3m", 12])
def test_bad_duration_is_named(duration):
    errors = _errors(_with(lambda r: r["slots"][0].update(expire_after=duration)))
    assert len(errors) == 1 and errors[0].startswith("slot 'user': expire_after: bad duration")
    assert repr(duration) in errors[0]


def test_bad_join_window():
    errors = _errors(_with(lambda r: r["join"].update(window="soon")))
    assert errors == ["join.window: bad duration 'soon': write a number and a unit, one of ms/s/m/h/d/w (e.g. '30m')"]


def test_more_slots_than_the_fid_layout_allows():
    slots = [{"name": f"s{i}", "source": "user_id"} for i in range(MAX_SLOT_ID + 1)]
    errors = _errors(_with(lambda r: r.update(slots=slots)))
    assert f"slots: {MAX_SLOT_ID + 1} slots, but the fid layout (15-bit slot id) allows at most {MAX_SLOT_ID}" in errors
    assert any(f"slot 's{MAX_SLOT_ID}': id {MAX_SLOT_ID + 1} does not fit" in e for e in errors)


def test_explicit_slot_id_out_of_range_and_reused():
    def mutate(r):
        r["slots"][0]["id"] = 40_000
        r["slots"][1]["id"] = 3
    errors = _errors(_with(mutate))
    assert "slot 'user': id 40000 does not fit the fid layout's 15-bit slot (max 32767)" in errors
    assert "slot 'genres': id 3 already used by slot 'item'" in errors


def test_slot_kind_must_fit_the_field_type():
    errors = _errors(_with(lambda r: r["slots"][2].update(kind="categorical")))
    assert any("slot 'genres'" in e and "categorical slot needs" in e for e in errors)
    errors = _errors(_with(lambda r: r["slots"][3].update(source="gender")))
    assert any("slot 'age'" in e and "'gender'" in e and "numeric" in e for e in errors)


def test_unknown_keys_and_labels_are_reported_together():
    def mutate(r):
        r["slots"][0]["dimension"] = 4
        r["labels"] = {"actions": ["like", "swipe"], "target": "buy"}
        r["sampling"]["negative_rate"] = 1.5
    errors = _errors(_with(mutate))
    assert any("slot 'user': unknown key 'dimension'" in e for e in errors)
    assert any("labels.actions: 'swipe' is not an action type" in e for e in errors)
    assert any("labels.target: 'buy'" in e for e in errors)
    assert "sampling.negative_rate: must be in (0, 1], got 1.5" in errors


def test_deepfm_needs_one_dim():
    errors = _errors(_with(lambda r: (r["slots"][1].update(dim=4), r.update(model={"kind": "deepfm"}))))
    assert any(e.startswith("model.kind: deepfm's factorisation machine needs one dim") for e in errors)


def test_durations_and_fids():
    assert parse_duration_ms("500ms") == 500
    assert parse_duration_ms("7d") == 604_800_000
    fid = make_fid(MAX_SLOT_ID, (1 << 60) + 5)
    assert fid > 0 and slot_of(fid) == MAX_SLOT_ID and fid & ((1 << 48) - 1) == 5
    with pytest.raises(ValueError, match="slot id must be in"):
        make_fid(0, 1)


def test_validate_command_exit_codes(tmp_path, capsys):
    assert main(["validate", "movielens"]) == 0
    assert "bytes_per_row" in capsys.readouterr().out.splitlines()[-1]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with(lambda r: r["slots"][0].update(dim=0))))
    assert main(["validate", str(bad)]) == 1
    assert "slot 'user': dim must be an integer > 0, got 0" in capsys.readouterr().err


def test_spec_path_resolves_relative_avsc(tmp_path):
    schema_file = tmp_path / "my_impression.avsc"
    from schemas.events import schema_path
    schema_file.write_text(schema_path("movielens_impression").read_text())
    raw = _with(lambda r: r["events"].update(impression="my_impression.avsc"))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    assert load_spec(spec_file).events.impression == str(schema_file)
    assert spec_path("movielens").name == "movielens.yaml"


def test_sequential_updates_are_auto_on_small_batches_and_bounded():
    assert parse_spec(BASE).training.uses_sequential_updates  # the online default
    large = parse_spec({**BASE, "training": {"batch_size": 4096}}).training
    assert not large.uses_sequential_updates  # a large batch trains as a batch
    cowclip = parse_spec({**BASE, "training": {"batch_size": 64, "cowclip": {"enabled": True}}}).training
    assert not cowclip.uses_sequential_updates
    forced = parse_spec({**BASE, "training": {"batch_size": 512, "sequential_updates": True}}).training
    assert forced.uses_sequential_updates
    [error] = _errors({**BASE, "training": {"sequential_updates": "sometimes"}})
    assert "training.sequential_updates" in error and "'sometimes'" in error
    [error] = _errors({**BASE, "training": {"batch_size": 4096, "sequential_updates": True}})
    assert "batch_size <= 1024" in error and "4096" in error


def test_snapshot_retention_is_a_count_or_all():
    from schemas.spec_json import spec_from_json, spec_to_json

    assert parse_spec(BASE).snapshot.keep == 7
    assert parse_spec(_with(lambda raw: raw.update(snapshot={"every": "1h", "keep": 3}))).snapshot.keep == 3
    kept = parse_spec(_with(lambda raw: raw.update(snapshot={"keep": "all"})))
    assert kept.snapshot.keep is None and spec_from_json(spec_to_json(kept)) == kept
    for bad in (0, "some", 2.5, True):
        [error] = _errors(_with(lambda raw: raw.update(snapshot={"keep": bad})))
        assert "snapshot.keep" in error and repr(bad) in error
    # a model directory written before retention stores no "keep": it reads as the default
    stored = json.loads(spec_to_json(kept))
    del stored["snapshot"]["keep"]
    assert spec_from_json(json.dumps(stored)).snapshot.keep == 7


def test_publish_intervals_and_their_older_name_sync():
    from schemas.spec_json import spec_from_json, spec_to_json

    published = parse_spec(_with(lambda raw: raw.update(publish={"sparse_every": "30s", "dense_every": "2h"})))
    assert (published.publish.sparse_every_ms, published.publish.dense_every_ms) == (30_000, 7_200_000)
    older = parse_spec(_with(lambda raw: raw.update(sync={"sparse_every": "30s", "dense_every": "2h"})))
    assert older == published
    both = _errors(_with(lambda raw: raw.update(sync={}, publish={})))
    assert any("publish and sync" in error for error in both)
    assert any("sync.sparse_every" in error for error in _errors(_with(lambda raw: raw.update(
        sync={"sparse_every": "soon"}))))
    # a model directory written before the rename stores the spec with "sync"
    stored = spec_to_json(published).replace('"publish"', '"sync"')
    assert spec_from_json(stored) == published


def test_trainer_workers_are_bounded_and_single_worker_settings_refused():
    two = parse_spec(_with(lambda raw: raw.update(training={"workers": 2, "batch_size": 32})))
    assert two.training.workers == 2 and not two.training.uses_sequential_updates  # plain updates when sharded
    assert any("training.workers" in error for error in _errors(_with(lambda raw: raw.update(training={"workers": 0}))))
    assert any("single-worker" in error for error in _errors(_with(lambda raw: raw.update(
        training={"workers": 2, "sequential_updates": True}))))
