"""A model directory is written by one process and read by others (serving, ``--resume``): nothing
in it may run code or reach outside it, and a malformed manifest is named, never fatal."""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest

from schemas.spec import parse_spec
from trainer.online import OnlineTrainer
from trainer.publish import MANIFEST, ModelDirError, Position, Publisher, read_manifest, read_spec, restore_trainer

SPEC = {"name": "t", "events": {"impression": "movielens_impression", "action": "action"},
        "defaults": {"dim": 4}, "slots": [{"name": "item", "source": "item_id"}],
        "labels": {"actions": ["like"]}, "model": {"kind": "deepfm", "hidden_units": [8]}}


class _Payload:
    """Unpickling this runs ``os.system`` (what an attacker's file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture()
def model_dir(tmp_path):
    trainer = OnlineTrainer(parse_spec(SPEC))
    publisher = Publisher(trainer, tmp_path / "model")
    publisher.publish_snapshot(Position())
    publisher.publish_dense()
    return tmp_path / "model"


def _rewrite(model_dir, name, content: bytes):
    """Replace a file and its checksum, as someone with write access to the directory can."""
    (model_dir / name).write_bytes(content)
    manifest = json.loads((model_dir / MANIFEST).read_text())
    for entry in manifest["versions"]:
        if name in entry["sha256"]:
            entry["sha256"][name] = hashlib.sha256(content).hexdigest()
    (model_dir / MANIFEST).write_text(json.dumps(manifest))


def _set_manifest(model_dir, manifest):
    (model_dir / MANIFEST).write_text(json.dumps(manifest))


def test_the_spec_is_json_and_a_planted_pickle_is_never_read(model_dir, tmp_path):
    from serving.model import ServingModel

    assert json.loads((model_dir / "spec.json").read_text())["name"] == "t"
    marker = tmp_path / "spec-ran"
    (model_dir / "spec.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    ServingModel(model_dir).refresh()
    assert not marker.exists()


def test_a_spec_that_is_not_a_spec_is_refused_naming_the_file(model_dir):
    (model_dir / "spec.json").write_text(json.dumps({"name": "t", "slots": "oops"}))
    with pytest.raises(ModelDirError, match="spec.json"):
        read_spec(model_dir)


@pytest.mark.parametrize("reader", ["serving", "resume"])
def test_a_crafted_state_file_does_not_run(model_dir, tmp_path, reader):
    from serving.model import ServingModel

    marker = tmp_path / "state-ran"
    snapshot = next(e for e in read_manifest(model_dir) if e["kind"] == "snapshot")
    _rewrite(model_dir, f"{snapshot['path']}/state.pt", pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelDirError, match="state.pt is not a plain tensor file"):
        if reader == "serving":
            ServingModel(model_dir).refresh()
        else:
            restore_trainer(OnlineTrainer(parse_spec(SPEC)), model_dir)
    assert not marker.exists()


def test_a_resumed_trainer_loads_its_snapshot_as_plain_tensors(model_dir):
    trainer = OnlineTrainer(parse_spec(SPEC))
    position, entry = restore_trainer(trainer, model_dir)
    assert entry["kind"] == "snapshot" and position == Position()


@pytest.mark.parametrize("path", ["../evil/evil.arrow", "/etc/passwd", "v000001-snapshot/../../x", "a\\b", ""])
def test_manifest_paths_outside_the_directory_are_refused_naming_the_entry(model_dir, path):
    manifest = json.loads((model_dir / MANIFEST).read_text())
    manifest["versions"][1]["sha256"] = {path: "0" * 64}
    _set_manifest(model_dir, manifest)
    with pytest.raises(ModelDirError, match=r"manifest entry 1 \(version 2\)"):
        read_manifest(model_dir)
    manifest["versions"][1]["sha256"] = {}
    manifest["versions"][1]["path"] = path
    _set_manifest(model_dir, manifest)
    with pytest.raises(ModelDirError, match=r"manifest entry 1 \(version 2\)"):
        read_manifest(model_dir)


def test_a_symlink_out_of_the_directory_is_refused(model_dir, tmp_path):
    (tmp_path / "outside.pt").write_bytes(b"x")
    os.symlink(tmp_path / "outside.pt", model_dir / "link.pt")
    manifest = json.loads((model_dir / MANIFEST).read_text())
    manifest["versions"][1]["path"] = "link.pt"
    _set_manifest(model_dir, manifest)
    with pytest.raises(ModelDirError, match="leads outside the model directory"):
        read_manifest(model_dir)


@pytest.mark.parametrize("broken, named", [
    (lambda m: m["versions"][1].pop("published_at"), "'published_at' must be"),
    (lambda m: m.update(versions="none"), "a list 'versions'"),
    (lambda m: m["versions"].append(["not", "an", "entry"]), "manifest entry 2: expected an object"),
    (lambda m: m["versions"][1].update(kind="exploit"), "'kind' must be one of"),
])
def test_a_malformed_manifest_is_named_and_the_server_goes_on(model_dir, broken, named):
    from serving.model import ServingModel

    good = json.loads((model_dir / MANIFEST).read_text())
    model = ServingModel(model_dir)
    model.refresh()
    assert model.version == 2
    bad = json.loads(json.dumps(good))
    broken(bad)
    _set_manifest(model_dir, bad)
    with pytest.raises(ModelDirError, match=named):
        model.refresh()
    assert model.version == 2  # still serving the last good version
    _set_manifest(model_dir, good)
    model.refresh()
    assert model.last_error is None


def test_a_manifest_that_is_a_json_list_is_named(model_dir):
    _set_manifest(model_dir, [1, 2])
    with pytest.raises(ModelDirError, match="a manifest is an object"):
        read_manifest(model_dir)


def test_the_serving_poller_survives_a_malformed_manifest(model_dir):
    """The real server process: a manifest entry without published_at shows in /metrics as
    last_error; once the manifest is whole again, the next version is applied."""
    import time

    from serving.process import ServingProcess

    good = json.loads((model_dir / MANIFEST).read_text())
    server = ServingProcess(model_dir)
    try:
        assert server.wait_for_version(2)["version"] == 2
        bad = json.loads(json.dumps(good))
        bad["versions"][1].pop("published_at")
        _set_manifest(model_dir, bad)
        deadline = time.time() + 20
        while (metrics := server.client.get("/metrics").json())["last_error"] is None and time.time() < deadline:
            time.sleep(0.05)
        assert "published_at" in metrics["last_error"]
        assert server.client.get("/healthz").status_code == 200  # still serving version 2
        _set_manifest(model_dir, good)
        trainer = OnlineTrainer(parse_spec(SPEC))
        restore_trainer(trainer, model_dir)
        Publisher(trainer, model_dir).publish_dense()  # version 3
        metrics = server.wait_for_version(3)
        assert metrics["version"] == 3 and metrics["last_error"] is None
    finally:
        server.stop()


def test_a_damaged_delta_is_skipped_once_a_newer_snapshot_exists(model_dir):
    from serving.model import ServingModel

    trainer = OnlineTrainer(parse_spec(SPEC))
    restore_trainer(trainer, model_dir)
    publisher = Publisher(trainer, model_dir)
    delta = publisher.publish_dense()  # version 3, damaged for good below
    (model_dir / delta["path"]).write_bytes(b"damaged")
    model = ServingModel(model_dir)
    model.refresh()  # the snapshot (1) and the dense weights (2); 3 is refused
    assert model.version == 2 and "version 3" in model.last_error
    publisher.publish_dense()  # 4: on top of the damaged 3, cannot be applied either
    with pytest.raises(ModelDirError, match="version 3"):
        model.refresh()
    assert model.version == 2
    publisher.publish_snapshot(Position())  # 5: self-contained
    publisher.publish_dense()  # 6
    model.refresh()
    assert model.version == 6
    assert "skipped to snapshot version 5" in model.last_error
    model.refresh()
    assert model.last_error is None  # nothing new, nothing wrong


def test_serving_answers_oversized_requests_413_and_keeps_serving(model_dir):
    """Body bytes and impressions per request are bounded (configurable); a refused request is
    read no further and the server stays responsive."""

    from serving.process import ServingProcess

    server = ServingProcess(model_dir, "--max-body-bytes", "100000", "--max-impressions", "50")
    try:
        server.wait_for_version(2)
        record = {"request_id": "r", "user_id": "u", "item_id": "1", "impression_time_ms": 0}
        too_many = server.predict([record] * 51)
        assert too_many.status_code == 413 and "at most 50" in too_many.json()["error"]
        too_big = server.client.post("/predict", content=b'{"impressions": [' + b" " * 200_000 + b"]}",
                                     headers={"content-type": "application/json"})
        assert too_big.status_code == 413 and "100000 bytes" in too_big.json()["error"]
        not_json = server.client.post("/predict", content=b"{nope", headers={"content-type": "application/json"})
        assert not_json.status_code == 422
        assert server.client.get("/healthz").status_code == 200
        assert server.predict([record]).status_code in (200, 422)  # the schema decides, not the limits
    finally:
        server.stop()
