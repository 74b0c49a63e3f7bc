"""Kafka: a real broker (Tansu, started here on loopback and stopped by process group) and
``streamrec produce`` replaying real MovieLens-100K logs into it, read back with a Kafka client."""
from __future__ import annotations

import io
import json

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
