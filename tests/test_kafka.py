"""Kafka: a real broker (Tansu, started here on loopback and stopped by process group) and
``streamrec produce`` replaying real MovieLens-100K logs into it, read back with a Kafka client."""
from __future__ import annotations

import io
import json
import sys

import pytest

from runners.kafka_assets import broker_binary

try:
    broker_binary()
    import confluent_kafka  # noqa: F401
except (FileNotFoundError, ImportError) as missing:  # make fetches the broker (runners.kafka_assets)
    pytest.skip(f"no Kafka broker or client here: {missing}", allow_module_level=True)


@pytest.fixture()
def broker(tmp_path):
    from runners.kafka_broker import KafkaBroker

    started = KafkaBroker(tmp_path / "broker").start()
    process = started.process
    yield started
    started.stop()
    assert process.poll() is not None and started.process is None


def _consume(bootstrap: str, topic: str, end_offsets: dict) -> list:
    """Every message of ``topic`` up to the producer's end offsets (partition -> offset)."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{topic}", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, int(partition), 0) for partition in end_offsets])
    messages, deadline = [], time.monotonic() + 60
    want = sum(end_offsets.values())
    while len(messages) < want and time.monotonic() < deadline:
        for message in consumer.consume(10_000, timeout=0.5):
            assert message.error() is None, message.error()
            messages.append(message)
    consumer.close()
    return messages


def test_produce_replays_the_logs_into_kafka_in_event_time_order(broker, movielens_logs, capsys):
    import fastavro

    from runners.cli import main
    from schemas.events import load_schema
    from schemas.logs import read_log
    from schemas.spec import load_spec

    logs, _ = movielens_logs
    assert main(["produce", "--spec", "movielens", "--logs", str(logs), "--bootstrap", broker.bootstrap,
                 "--topics", "imp,act", "--partitions", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    spec = load_spec("movielens")
    for kind, topic in (("impressions", "imp"), ("actions", "act")):
        schema = load_schema(spec.events.impression if kind == "impressions" else spec.events.action)
        expected = list(read_log(logs, kind, schema))
        produced = summary["topics"][topic]
        assert produced["records"] == len(expected) > 1_000 and len(produced["end_offsets"]) == 3
        messages = _consume(broker.bootstrap, topic, {int(p): o for p, o in produced["end_offsets"].items()})
        parsed = fastavro.parse_schema(schema)
        decoded = [fastavro.schemaless_reader(io.BytesIO(m.value()), parsed, parsed) for m in messages]
        key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
        assert sorted(map(key, decoded)) == sorted(map(key, expected))  # every record, once, intact
        for message, record in zip(messages, decoded):
            assert message.timestamp()[1] == record["event_time_ms"]
            assert message.key().decode() == record["request_id"]
        for partition in range(3):  # each partition in event-time order
            times = [m.timestamp()[1] for m in messages if m.partition() == partition]
            assert times == sorted(times) and times
    assert summary["dead_letters"] == {} and summary["events"] == sum(t["records"] for t in summary["topics"].values())


def test_produce_names_a_broker_that_does_not_answer(movielens_logs, capsys):
    from runners.cli import main
    from serving.process import free_port

    logs, _ = movielens_logs
    code = main(["produce", "--spec", "movielens", "--logs", str(logs), "--bootstrap", f"127.0.0.1:{free_port()}"])
    assert code == 1 and "did not answer" in capsys.readouterr().err
    assert main(["produce", "--spec", "movielens", "--logs", str(logs), "--bootstrap", "h:1", "--topics", "a"]) == 1
    assert "--topics" in capsys.readouterr().err


def test_a_kafka_source_uri_is_parsed_and_bad_ones_are_named(tmp_path):
    from runners.kafka_source import KafkaSourceConfig

    offsets = tmp_path / "offsets.json"
    offsets.write_text('produced...\n{"topics": {"imp": {"end_offsets": {"0": 5}}, "act": {"end_offsets": {}}}}\n')
    config = KafkaSourceConfig.from_uri(f"kafka://h:9092,g:9093?impressions=imp&actions=act&group=g&until={offsets}"
                                        "&window_ms=60000&out_of_order_ms=0")
    assert config.topics == ("imp", "act") and config.bounded and config.end_offsets() == {"imp": {0: 5}, "act": {}}
    assert config.window_ms == 60_000 and config.out_of_order_ms == 0 and config.idle_ms == 30_000
    assert not KafkaSourceConfig.from_uri("kafka://h:1").bounded
    for uri, named in (("redis://h:1", "kafka://"), ("kafka://h", "HOST:PORT"), ("kafka://h:1?topic=x", "'topic'"),
                       ("kafka://h:1?impressions=a&actions=a", "two topics"), ("kafka://h:1?window_ms=0", "window_ms"),
                       ("kafka://h:1?idle_ms=x", "idle_ms"), (f"kafka://h:1?until={tmp_path}/none.json", "until="),
                       (f"kafka://h:1?impressions=other&until={offsets}", "'other'")):
        with pytest.raises(ValueError, match=named):
            KafkaSourceConfig.from_uri(uri)


def test_kafka_values_decode_to_tables_and_bad_or_late_ones_to_dead_letters_naming_their_offset():
    import fastavro

    from schemas.dead_letters import DeadLetterSink
    from schemas.events import log_schemas
    from schemas.kafka_records import KafkaBatch, decode_batch
    from schemas.spec import load_spec

    schemas = log_schemas(load_spec("movielens").events)
    action = {"request_id": "r", "item_id": "i", "user_id": "u", "action_type": "like", "event_time_ms": 5, "value": 1.0}

    def encoded(record) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schemas["actions"], record)
        return out.getvalue()

    good = encoded(action)
    values = [good, b"\xff\xfe garbage", good + b"\x00", None, encoded({**action, "event_time_ms": -1})]
    sink = DeadLetterSink()
    impressions, actions = decode_batch(KafkaBatch([1] * 5, values, [0, 1, 1, 0, 1], [7, 8, 9, 10, 11]),
                                        ("imp", "act"), schemas, sink)
    assert impressions.num_rows == 0 and actions.to_pylist() == [action]
    assert sink.counts == {"undecodable_record": 3, "event_time_out_of_range": 1}
    assert [letter.source for letter in sink.letters] == ["kafka:act/1@8", "kafka:act/1@9", "kafka:act/0@10",
                                                          "kafka:act/1@11"]
    assert "topic 'act' partition 1 offset 9" in sink.letters[1].detail and "1 bytes after" in sink.letters[1].detail
    late = DeadLetterSink()
    assert decode_batch(KafkaBatch([1], [good], [0], [3], late=True), ("imp", "act"), schemas, late)[1].num_rows == 0
    assert late.counts == {"late_event": 1} and "offset 3" in late.letters[0].detail



def test_the_kafka_decoder_udf_turns_an_arrow_batch_into_shard_records_and_dead_letters_and_notes_the_end(tmp_path):
    """``KafkaDecoder.eval`` as the SQL calls it (pandas columns of one Arrow batch): every output
    record rides pickled on the batch's last row, the other rows are NULL; a late record and a
    garbage one become dead letters; the read marker appears once every partition's last record
    (the offset below its end) has been decoded, and a reopened decoder removes it; with long
    bundles, the last-batch marker appears once the records left fit in one batch."""
    import pickle

    import fastavro
    import pandas as pd

    from pipelines.flink_kafka import EmitDecoded, KafkaDecoder, last_batch_marker
    from pipelines.flink_records import DEAD_LETTERS
    from pipelines.tables import load_table
    from schemas.events import log_schemas
    from schemas.spec import load_spec

    spec = load_spec("movielens")
    schemas = log_schemas(spec.events)
    impression = {"request_id": "r", "item_id": "i", "user_id": "u", "event_time_ms": 1_000}
    filler = {"int": 0, "long": 0, "float": 0.0, "double": 0.0, "string": "x", "boolean": False}

    def value_of(field):
        kind = field["type"]
        if isinstance(kind, list):  # a union: null where it may be
            return None if "null" in kind else filler[kind[0]]
        return [] if isinstance(kind, dict) and kind.get("type") == "array" else filler[kind]

    impression = {field["name"]: impression.get(field["name"], value_of(field)) for field in schemas["impressions"]["fields"]}
    action = {"request_id": "r", "item_id": "i", "user_id": "u", "action_type": "like", "event_time_ms": 2_000,
              "value": 1.0}

    def encoded(kind, record) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schemas[kind], record)
        return out.getvalue()

    marker = tmp_path / "read_to_end"
    decoder = KafkaDecoder(spec, ("imp", "act"), 2, str(tmp_path), None, {"imp": {0: 3}, "act": {0: 2}}, str(marker))
    decoder.open(None)
    first = decoder.eval(pd.Series([encoded("impressions", impression), b"\xff garbage"]), 0, pd.Series([0, 0]),
                         pd.Series([1, 2]), pd.Series([False, False]))
    assert first.iloc[0] is None and not marker.exists()  # imp/0's last record (offset 2) came; act/0's not yet
    second = decoder.eval(pd.Series([encoded("actions", action), encoded("actions", action)]), pd.Series([1, 1]),
                          pd.Series([0, 0]), pd.Series([0, 1]), pd.Series([True, False]))
    assert marker.exists()
    records = [record for result in (first, second) for record in EmitDecoded().process_element((0, result.iloc[-1]),
                                                                                                 None)]
    letters = [json.loads(record[1]) for record in records if record[0] is DEAD_LETTERS]
    assert sorted((letter["reason"], letter["source"]) for letter in letters) == [
        ("late_event", "kafka:act/0@0"), ("undecodable_record", "kafka:imp/0@2")]
    shards = [record for record in records if record[0] is not DEAD_LETTERS]
    assert sum(load_table(record[1]).num_rows for record in shards) == 1  # the impression
    assert sum(load_table(record[2]).num_rows for record in shards) == 1  # the on-time action
    assert pickle.loads(second.iloc[-1]) and second.iloc[0] is None
    decoder.close()
    KafkaDecoder(spec, ("imp", "act"), 2, str(tmp_path), None, {"imp": {0: 3}, "act": {0: 2}},
                 str(marker)).open(None)
    assert not marker.exists()  # a restarted decoder: the records after its checkpoint come again

    # Long bundles (batches of 2 here): once the records left fit in one batch, the decoder says so
    last_batch = last_batch_marker(marker)
    decoder = KafkaDecoder(spec, ("imp", "act"), 2, str(tmp_path), None, {"imp": {0: 3}, "act": {0: 2}},
                           str(marker), batch_records=2)
    decoder.open(None)
    decoder.eval(pd.Series([encoded("impressions", impression)] * 3), 0, pd.Series([0, 0, 0]), pd.Series([0, 1, 2]),
                 pd.Series([False] * 3))
    assert not last_batch.exists()  # nothing of act/0 seen yet: how much is left there is not known
    decoder.eval(pd.Series([encoded("actions", action)]), 1, pd.Series([0]), pd.Series([0]), pd.Series([False]))
    assert last_batch.exists() and not marker.exists()  # one record left (act/0 offset 1) < a batch of 2
    decoder.eval(pd.Series([encoded("actions", action)]), 1, pd.Series([0]), pd.Series([1]), pd.Series([False]))
    assert marker.exists()
    decoder.open(None)
    assert not marker.exists() and not last_batch.exists()

def test_the_flink_job_reads_kafka_topics_into_the_file_replays_examples_and_a_garbage_record_into_one_dead_letter(
        broker, movielens_logs, tmp_path):
    """MovieLens-100K produced into a broker this test started, plus one garbage record, read by
    ``run --runner flink --source kafka://...?until=OFFSETS`` (a bounded source ending at the
    producer's offsets): the same Examples as the file replay, trained in the same total order
    (the same progressive AUC and logloss to 4 decimals), and one dead letter naming the garbage
    record's topic, partition and offset; then the group's committed offsets are the end offsets,
    so a second job of the group has nothing to read and ends at once."""
    from confluent_kafka import Producer

    from runners.produce import produce_logs
    from schemas.spec import load_spec
    from tests.test_flink import _examples, _run_to_end

    logs, _ = movielens_logs
    summary = produce_logs(load_spec("movielens"), logs, broker.bootstrap, {"impressions": "imp", "actions": "act"})
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    garbage_at = []
    producer.produce("imp", value=b"\x00not avro\xff", partition=0, timestamp=1_000,
                     on_delivery=lambda error, message: garbage_at.append(message.offset()))
    producer.flush(30)
    summary["topics"]["imp"]["end_offsets"]["0"] = garbage_at[0] + 1
    offsets = tmp_path / "offsets.json"
    offsets.write_text(json.dumps(summary))

    source = f"kafka://{broker.bootstrap}?impressions=imp&actions=act&until={offsets}"
    run = [sys.executable, "-m", "runners.cli", "run", "--runner", "flink", "--spec", "movielens", "--no-progress"]
    kafka = _run_to_end([*run, "--source", source, "--out", str(tmp_path / "kafka")], timeout_s=600)
    files = _run_to_end([*run, "--logs", str(logs), "--out", str(tmp_path / "files")], timeout_s=600)
    assert kafka["mode"] == "flink kafka" and kafka["examples"] == files["examples"] > 50_000
    assert 0.6 < files["auc"] < 1  # a model that learned, trained in the same order from both sources:
    assert round(kafka["auc"], 4) == round(files["auc"], 4) and round(kafka["logloss"], 4) == round(files["logloss"], 4)
    assert _examples(tmp_path / "kafka").equals(_examples(tmp_path / "files"))
    letters = [json.loads(line) for path in (tmp_path / "kafka" / "dead_letters").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert [letter["reason"] for letter in letters] == ["undecodable_record"]
    assert letters[0]["source"] == f"kafka:imp/0@{garbage_at[0]}"
    assert f"topic 'imp' partition 0 offset {garbage_at[0]}" in letters[0]["detail"]
    # drained on its end marks, the job committed its end offsets: the group's next job reads nothing
    again = _run_to_end([sys.executable, "-m", "runners.cli", "join", "--runner", "flink", "--spec", "movielens",
                         "--source", source, "--out", str(tmp_path / "again")], timeout_s=600)
    assert again["examples"] == 0 and again["dead_letters"] == {}


def test_a_killed_kafka_job_resumes_from_its_checkpoint_without_loss_or_duplicates(broker, tmp_path):
    """``run --runner flink --source kafka://...`` is SIGKILLed (its process group) after a
    checkpoint and two model snapshots; ``--resume`` restores the source's offsets, the join's
    and the trainer's state from the checkpoint and the model from its snapshot: every Example is
    written once (the same as the Beam replay of the logs) and trained once."""
    from event_datasets.synthetic import SyntheticConfig, generate
    from runners.beam_runner import run_job
    from runners.options import JobOptions, Mode
    from runners.produce import produce_logs
    from schemas.spec import load_spec
    from tests.test_flink import _examples, _kill_after_a_checkpoint_and_two_snapshots, _run_to_end

    logs, out, model = tmp_path / "logs", tmp_path / "flink", tmp_path / "model"
    generate(logs, SyntheticConfig(events=60_000, span_hours=96, seed=1))  # snapshots daily: 3 mid-stream
    offsets = tmp_path / "offsets.json"
    offsets.write_text(json.dumps(produce_logs(load_spec("synthetic"), logs, broker.bootstrap)))
    command = [sys.executable, "-m", "runners.cli", "run", "--runner", "flink", "--spec", "synthetic",
               "--source", f"kafka://{broker.bootstrap}?until={offsets}", "--out", str(out), "--model-dir",
               str(model), "--no-progress", "--checkpoint-every", "1", "--events-per-step", "2048"]
    _kill_after_a_checkpoint_and_two_snapshots(command, out, model, tmp_path / "first.log")
    summary = _run_to_end(command + ["--resume"])
    assert summary["restored_from_checkpoint"] and summary["resumed_from_version"] is not None
    run_job(load_spec("synthetic"), JobOptions(out=tmp_path / "beam", logs=logs, mode=Mode.REPLAY))
    kafka_examples, beam_examples = _examples(out), _examples(tmp_path / "beam")
    assert kafka_examples.num_rows == beam_examples.num_rows > 40_000  # no loss, no duplicates
    assert kafka_examples.equals(beam_examples)
    assert summary["examples"] == beam_examples.num_rows and summary["out_of_order_examples"] == 0
    assert not (out / ".checkpoints").exists() and not (out / ".kafka-batches").exists()


def test_a_live_kafka_job_stops_on_sigterm_by_draining_every_example_it_read(broker, tmp_path):
    """``join --runner flink --source kafka://HOST:PORT`` without ``until`` runs until stopped.
    Once its consumer group has committed every produced offset (a checkpoint completed after the
    job read them), SIGTERM to the driver drains the job: it exits 0, and the windows and join
    windows still open are closed, so every Example of the logs is written (the Beam replay's)."""
    import os
    import signal
    import subprocess
    import time

    from event_datasets.synthetic import SyntheticConfig, generate
    from runners.beam_runner import run_job
    from runners.kafka_source import KafkaSourceConfig, ends_committed
    from runners.options import JobOptions, Mode
    from runners.produce import produce_logs
    from schemas.spec import load_spec
    from tests.test_flink import ROOT, _examples, _kill_group

    spec = load_spec("synthetic")
    logs, out = tmp_path / "logs", tmp_path / "live"
    generate(logs, SyntheticConfig(events=20_000, span_hours=6, seed=2))
    produced = produce_logs(spec, logs, broker.bootstrap)
    ends = {topic: {int(p): end for p, end in about["end_offsets"].items()} for topic, about in produced["topics"].items()}
    source = f"kafka://{broker.bootstrap}?group=live-test"
    job = subprocess.Popen([sys.executable, "-m", "runners.cli", "join", "--runner", "flink", "--spec", "synthetic",
                            "--source", source, "--out", str(out)], cwd=ROOT, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ends_committed(KafkaSourceConfig.from_uri(source), spec, ends):
            assert job.poll() is None, job.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the live job's group never committed the produced offsets"
            time.sleep(1)
        assert job.poll() is None  # live: it does not end by itself
        os.kill(job.pid, signal.SIGTERM)  # the driver only, as a supervisor stops a service
        stdout, stderr = job.communicate(timeout=240)
    finally:
        _kill_group(job)
    assert job.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["mode"] == "flink kafka live"
    run_job(spec, JobOptions(out=tmp_path / "beam", logs=logs, mode=Mode.REPLAY))
    beam_examples = _examples(tmp_path / "beam")
    assert summary["examples"] == beam_examples.num_rows > 10_000
    assert _examples(out).equals(beam_examples)


def test_a_kafka_job_runs_on_a_standalone_cluster(broker, tmp_path):
    """``join --runner flink --flink-master HOST:PORT --source kafka://...?until=OFFSETS`` on a
    standalone cluster started from the wheel: submitted through ``flink run`` with the connector
    jars (added to the job's jars beside flink-python's), it finishes and writes the Beam
    replay's Examples."""
    import subprocess

    from event_datasets.synthetic import SyntheticConfig, generate
    from runners.beam_runner import run_job
    from runners.flink_cluster import StandaloneCluster
    from runners.options import JobOptions, Mode
    from runners.produce import produce_logs
    from schemas.spec import load_spec
    from tests.test_flink import ROOT, _examples

    spec = load_spec("synthetic")
    logs = tmp_path / "logs"
    generate(logs, SyntheticConfig(events=5_000, span_hours=2, seed=3))
    offsets = tmp_path / "offsets.json"
    offsets.write_text(json.dumps(produce_logs(spec, logs, broker.bootstrap)))
    cluster = StandaloneCluster(tmp_path / "cluster").start()
    processes = list(cluster.processes)
    try:
        job = subprocess.run([sys.executable, "-m", "runners.cli", "join", "--runner", "flink", "--flink-master",
                              cluster.master, "--spec", "synthetic", "--source",
                              f"kafka://{broker.bootstrap}?until={offsets}", "--out", str(tmp_path / "remote")],
                             cwd=ROOT, start_new_session=True, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stderr[-3000:]
        assert [j["state"] for j in cluster.jobs()] == ["FINISHED"]
    finally:
        cluster.stop()
    assert all(process.poll() is not None for process in processes)
    run_job(spec, JobOptions(out=tmp_path / "beam", logs=logs, mode=Mode.REPLAY))
    beam_examples = _examples(tmp_path / "beam")
    assert _examples(tmp_path / "remote").equals(beam_examples) and beam_examples.num_rows > 4_000


def test_the_decoders_bundle_settings_stay_its_own_and_the_jobs_python_operators_keep_the_jobs():
    """The decoder's SQL sets its own bundles (thousands of records, 5 s), and the planner copies
    a table's settings into the job's: the job's DataStream Python operators (``EmitDecoded``,
    the join, the trainer) must still get the job's bundle size - one record for a training
    job - and its 1 s bundles."""
    from tests.test_flink import _run_to_end

    settings = _run_to_end([sys.executable, "-m", "tests.flink_python_settings", "1"], timeout_s=300)
    decoders = [name for name in settings if name.startswith("PythonCalc")]
    assert len(decoders) == 1 and settings[decoders[0]] == [str(1_000 * 16_384), "5000"]
    assert settings["emit decoded"] == ["1", "1000"]
    assert all(value == ["1", "1000"] for name, value in settings.items() if name not in decoders)
