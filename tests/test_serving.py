"""Publishing, a real serving process on loopback, refusals, and kill-and-resume of the job."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from serving.process import ROOT, ServingProcess

FP32_TOLERANCE = 1e-5  # serving and trainer run the same float32 forward pass
FP16_TOLERANCE = 5e-3  # rows rounded to float16 (relative 2^-11) move probabilities by a few 1e-4


Server = ServingProcess


@pytest.fixture(scope="module")
def movielens_parts(movielens_logs):
    from schemas.dead_letters import DeadLetterSink
    from schemas.events import load_schema
    from schemas.logs import read_log_tables
    from schemas.spec import load_spec
    from transforms.log_examples import examples_from_logs

    logs, _ = movielens_logs
    spec = load_spec("movielens")
    examples = examples_from_logs(spec, logs).slice(0, 6_000)
    impressions = read_log_tables(logs, "impressions", load_schema(spec.events.impression), DeadLetterSink())
    probes = impressions.slice(0, 40).to_pylist()
    return spec, examples, probes


def _trainer_probabilities(trainer, spec, records):
    from transforms.features import FeatureExtractor

    extractor = FeatureExtractor(spec)
    fids, dense, _, _ = extractor.extract(extractor.table_from_records(records))
    return 1 / (1 + np.exp(-trainer.predict_features(fids, dense).astype(np.float64)))


def test_serving_predicts_what_the_trainer_predicts_at_every_version(movielens_parts, tmp_path):
    from trainer.online import OnlineTrainer
    from trainer.publish import Position, Publisher, read_manifest

    spec, examples, probes = movielens_parts
    trainer = OnlineTrainer(spec)
    publisher = Publisher(trainer, tmp_path / "model")
    publisher.publish_snapshot(Position())
    servers = {"fp32": Server(tmp_path / "model"), "fp16": Server(tmp_path / "model", "--fp16")}
    try:
        checked = 0
        for start in range(0, examples.num_rows, 1_500):
            for offset in range(start, start + 1_500, spec.training.batch_size):
                trainer.train_batch(examples.slice(offset, min(spec.training.batch_size, start + 1_500 - offset)))
            before = servers["fp32"].predict(probes).json()["probabilities"]
            publisher.publish_sparse()  # rows first: serving now differs from the trainer in dense weights only
            status = servers["fp32"].wait_for_version(publisher.version)
            assert status["version"] == publisher.version and status["last_error"] is None
            assert servers["fp32"].predict(probes).json()["probabilities"] != before
            for publish in (publisher.publish_dense, lambda: publisher.publish_snapshot(Position())):
                entry = publish()
                expected = _trainer_probabilities(trainer, spec, probes)
                for name, tolerance in (("fp32", FP32_TOLERANCE), ("fp16", FP16_TOLERANCE)):
                    assert servers[name].wait_for_version(entry["version"])["version"] == entry["version"]
                    answer = servers[name].predict(probes).json()
                    assert answer["version"] == entry["version"]
                    np.testing.assert_allclose(answer["probabilities"], expected, atol=tolerance)
                    checked += 1
        assert checked == 16
        versions = read_manifest(tmp_path / "model")
        assert [e["version"] for e in versions] == list(range(1, len(versions) + 1))
        assert all(e["base_version"] == e["version"] - 1 for e in versions)
        assert servers["fp32"].client.get("/healthz").json() == {"ok": True, "version": publisher.version}
    finally:
        for server in servers.values():
            server.stop()


def test_retention_prunes_the_versions_before_the_oldest_kept_snapshot(movielens_parts, tmp_path):
    """``snapshot.keep: 2``: a snapshot that makes a third prunes every version before the older
    kept one (manifest first, then files, a crash's leftover temporary file too); a reader that
    held a pruned version jumps to the newest snapshot, answers as a fresh reader does, and a
    resume starts from the newest snapshot."""
    import dataclasses

    from serving.model import ServingModel
    from trainer.online import OnlineTrainer
    from trainer.publish import Position, Publisher, read_manifest, restore_trainer

    spec, examples, probes = movielens_parts
    spec = dataclasses.replace(spec, snapshot=dataclasses.replace(spec.snapshot, keep=2))
    model = tmp_path / "model"
    trainer = OnlineTrainer(spec)
    publisher = Publisher(trainer, model)
    publisher.publish_snapshot(Position())
    lagging = ServingModel(model)
    assert lagging.refresh() == [1]
    for round_ in range(3):  # versions 2-4, 5-7, 8-10: sparse, dense, snapshot
        trainer.train(examples.slice(round_ * 1_000, 1_000))
        publisher.publish_sparse()
        publisher.publish_dense()
        if round_ == 2:
            (model / ".v000006-dense.pt.x1y2.tmp").write_bytes(b"left by a killed writer")
        publisher.publish_snapshot(Position(examples=(round_ + 1) * 1_000))
        kept = [entry["version"] for entry in read_manifest(model)]
        assert kept == list(range([1, 4, 7][round_], 3 * round_ + 5))  # (two snapshots and what follows them)
    assert sorted(path.name for path in model.iterdir()) == [
        "manifest.json", "spec.json", "v000007-snapshot", "v000008-sparse.arrow", "v000009-dense.pt",
        "v000010-snapshot"]
    assert lagging.refresh() == [10] and lagging.version == 10 and lagging.last_error is None
    fresh = ServingModel(model)
    assert fresh.refresh() == [10]
    expected = _trainer_probabilities(trainer, spec, probes)
    for reader in (lagging, fresh):
        np.testing.assert_allclose(reader.predict(probes)[0], expected, atol=FP32_TOLERANCE)
    position, entry = restore_trainer(OnlineTrainer(spec), model)
    assert entry["version"] == 10 and position.examples == 3_000


def test_corrupt_and_out_of_order_versions_are_refused_and_serving_keeps_answering(movielens_parts, tmp_path):
    from trainer.online import OnlineTrainer
    from trainer.publish import MANIFEST, Position, Publisher

    spec, examples, probes = movielens_parts
    trainer = OnlineTrainer(spec)
    publisher = Publisher(trainer, tmp_path / "model")
    publisher.publish_snapshot(Position())
    trainer.train(examples.slice(0, 1_000))
    good = publisher.publish_dense()
    server = Server(tmp_path / "model")
    try:
        assert server.wait_for_version(good["version"])["version"] == good["version"]
        served = server.predict(probes).json()["probabilities"]
        # a delta damaged after publishing: checksum mismatch
        trainer.train(examples.slice(1_000, 1_000))
        bad = publisher.publish_sparse()
        path = tmp_path / "model" / bad["path"]
        path.write_bytes(path.read_bytes()[:100])
        time.sleep(0.5)
        status = server.client.get("/metrics").json()
        assert status["version"] == good["version"] and "corrupt" in status["last_error"]
        assert server.predict(probes).json() == {"probabilities": served, "version": good["version"]}
        # a version whose base is not the version in hand: out of order
        manifest = json.loads((tmp_path / "model" / MANIFEST).read_text())
        manifest["versions"][-1]["base_version"] = 0
        (tmp_path / "model" / MANIFEST).write_text(json.dumps(manifest))
        time.sleep(0.5)
        status = server.client.get("/metrics").json()
        assert status["version"] == good["version"] and "out of order" in status["last_error"]
        # malformed requests: 4xx with the reason, nothing crashes
        broken = dict(probes[0])
        del broken["user_id"]
        response = server.predict([broken])
        assert response.status_code == 422 and "user_id" in response.json()["error"]
        wrong_type = {**probes[0], "event_time_ms": "yesterday"}
        response = server.predict([wrong_type])
        assert response.status_code == 422 and "event_time_ms" in response.json()["error"]
        assert server.client.post("/predict", json=[1, 2]).status_code == 422
        assert server.predict([]).status_code == 422
        # checked as the log readers check a record: no coercion, the record and field named
        for field, value in (("genres", "Horror"), ("age", 20.7), ("event_time_ms", 1.5), ("age", True)):
            response = server.predict([probes[0], {**probes[0], field: value}])
            error = response.json()["error"]
            assert response.status_code == 422 and error.startswith("impression 1:") and repr(field) in error, error
        defaults = {key: value for key, value in probes[0].items() if key not in ("age", "genres", "position")}
        filled = {**defaults, "age": 0, "genres": [], "position": 0}
        answers = [server.predict([record]) for record in (defaults, filled)]
        assert [a.status_code for a in answers] == [200, 200] and answers[0].json() == answers[1].json()
        assert server.predict(probes).status_code == 200
    finally:
        server.stop()


def test_serving_without_a_snapshot_says_so(movielens_parts, tmp_path):
    from trainer.online import OnlineTrainer
    from trainer.publish import Publisher

    spec, _, probes = movielens_parts
    Publisher(OnlineTrainer(spec), tmp_path / "model")  # a model directory with nothing published
    server = Server(tmp_path / "model")
    try:
        health = server.client.get("/healthz")
        assert health.status_code == 503 and "no snapshot" in health.json()["error"]
        assert server.predict(probes).status_code == 503
    finally:
        server.stop()


def test_killed_job_resumes_from_its_newest_snapshot(movielens_logs, tmp_path, capsys):
    """SIGKILL the whole job mid-stream, once retention has pruned its first versions, restart it
    with --resume: it completes, the progressive AUC matches an uninterrupted run, the versions
    continue without a gap or a repeat, and the directory keeps ``snapshot.keep`` snapshots."""
    from runners.cli import main
    from trainer.publish import read_manifest

    logs, _ = movielens_logs
    model = tmp_path / "model"
    job = subprocess.Popen([sys.executable, "-m", "runners.cli", "run", "--no-progress", "--logs", str(logs),
                            "--out", str(tmp_path / "killed"), "--model-dir", str(model)], cwd=ROOT,
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (entries := read_manifest(model)) or entries[0]["version"] == 1:  # (8 snapshots: 1 pruned)
            assert job.poll() is None and time.time() < deadline, "the job ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    before = read_manifest(model)
    server = Server(model)
    try:
        assert main(["run", "--no-progress", "--logs", str(logs), "--out", str(tmp_path / "resumed"),
                     "--model-dir", str(model), "--resume"]) == 0
        resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        after = read_manifest(model)
        assert server.wait_for_version(after[-1]["version"])["version"] == after[-1]["version"]
        assert server.client.get("/metrics").json()["last_error"] is None
    finally:
        server.stop()
    assert resumed["resumed_from_version"] is not None and resumed["examples"] == 100_000
    first = after[0]["version"]
    assert first > before[0]["version"] and after[0]["kind"] == "snapshot"
    assert [e["version"] for e in after] == list(range(first, first + len(after)))
    assert all(e["base_version"] == e["version"] - 1 for e in after)
    kept = [e for e in before if e["version"] >= first]
    assert after[:len(kept)] == kept and len(after) > len(kept)
    assert sum(e["kind"] == "snapshot" for e in after) == 7  # the spec's default snapshot.keep
    assert main(["run", "--no-progress", "--logs", str(logs), "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["auc"] == pytest.approx(whole["auc"], abs=0.003)
    assert resumed["logloss"] == pytest.approx(whole["logloss"], abs=0.003)
