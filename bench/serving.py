"""Publishing and serving: delta size, publish time, HTTP predict throughput and latency, staleness.

* ``delta_bytes_ratio``: a sparse delta after 60 s of event time / the full snapshot's bytes
  (synthetic spec, the table after training on the first part of the stream);
* ``publish_ms``: mean time to publish that delta (and ``snapshot_publish_ms``);
* ``predict_per_s`` / ``predict_p99_ms``: ``POST /predict`` with batches of 100 raw impressions
  against a ``streamrec serve`` process on loopback, one client; baseline in the same run: the
  same ``ServingModel.predict`` in-process (``http_vs_inprocess``);
* ``staleness_s``: live mode (processing-time clock) with a 10 s sparse publish interval: from an example
  being trained to serving answering with a version that holds it (mean; ``staleness_max_s``).
  It covers the interval + publish + poll + apply; the join adds its window for examples that wait for
  the window to close.

    python -m bench.serving [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)

    from event_datasets.synthetic import SyntheticConfig, generate
    from schemas.dead_letters import DeadLetterSink
    from schemas.events import load_schema
    from schemas.logs import read_log_tables
    from schemas.spec import load_spec
    from serving.model import ServingModel
    from serving.process import ServingProcess as Server
    from trainer.online import OnlineTrainer
    from trainer.publish import Position, Publisher
    from transforms.log_examples import synthetic_examples

    spec = load_spec("synthetic")
    spec = dataclasses.replace(spec, training=dataclasses.replace(spec.training, batch_size=1024))
    figures: dict = {"benchmark": "serving", "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        impressions_n = 40_000 if args.quick else 200_000
        generate(tmp / "logs", SyntheticConfig(events=impressions_n, seed=4, span_hours=2))
        examples = synthetic_examples(spec, impressions_n, seed=4)
        times = examples.column("impression_time_ms").to_numpy()
        trainer = OnlineTrainer(spec)
        publisher = Publisher(trainer, tmp / "model")
        warm = int(np.searchsorted(times, times[0] + 30 * 60_000))  # 30 min of traffic first
        trainer.train(examples.slice(0, warm))
        started = time.perf_counter()
        publisher.publish_snapshot(Position())
        figures["snapshot_publish_ms"] = round((time.perf_counter() - started) * 1000, 1)
        snapshot_bytes = publisher.published_bytes["snapshot"]
        end = int(np.searchsorted(times, times[warm] + 60_000))  # the next 60 s of event time
        trainer.train(examples.slice(warm, end - warm))
        started = time.perf_counter()
        publisher.publish_sparse()
        figures["publish_ms"] = round((time.perf_counter() - started) * 1000, 1)
        figures["delta_examples"] = end - warm
        figures["delta_bytes"] = publisher.published_bytes["sparse"]
        figures["snapshot_bytes"] = snapshot_bytes
        figures["delta_bytes_ratio"] = round(publisher.published_bytes["sparse"] / snapshot_bytes, 4)
        publisher.publish_dense()

        # predict over HTTP vs in-process
        records = read_log_tables(tmp / "logs", "impressions", load_schema(spec.events.impression),
                                  DeadLetterSink()).slice(0, 100).to_pylist()
        local = ServingModel(tmp / "model")
        local.refresh()
        server = Server(tmp / "model")
        try:
            requests = 100 if args.quick else 500
            server.wait_for_version(publisher.version)
            for _ in range(5):
                server.predict(records)
                local.predict(records)
            http_s, local_s, latencies = 0.0, 0.0, []
            for _ in range(requests):  # alternate, so noise hits both
                t0 = time.perf_counter()
                assert server.predict(records).status_code == 200
                t1 = time.perf_counter()
                local.predict(records)
                t2 = time.perf_counter()
                latencies.append(t1 - t0)
                http_s += t1 - t0
                local_s += t2 - t1
            figures["predict_per_s"] = round(requests * 100 / http_s)
            figures["inprocess_predict_per_s"] = round(requests * 100 / local_s)
            figures["http_vs_inprocess"] = round(local_s / http_s, 3)
            figures["predict_p50_ms"] = round(float(np.percentile(latencies, 50)) * 1000, 2)
            figures["predict_p99_ms"] = round(float(np.percentile(latencies, 99)) * 1000, 2)

            # staleness, live: processing-time clock, 10 s sparse publish interval, serving polls every 50 ms
            live = dataclasses.replace(spec, publish=dataclasses.replace(spec.publish, sparse_every_ms=10_000))
            trainer.spec = live
            live_publisher = Publisher(trainer, tmp / "model", clock="processing")
            live_publisher.last = {"sparse": live_publisher.now(), "dense": live_publisher.now(),
                                   "snapshot": live_publisher.now()}
            pending, staleness, cursor = [], [], end
            deadline = time.time() + (25 if args.quick else 65)
            while time.time() < deadline and cursor < examples.num_rows:
                trainer.train_batch(examples.slice(cursor, 256))
                cursor += 256
                pending.append(time.time())
                new = live_publisher.after_batch(Position())
                if new:
                    version = new[-1]["version"]
                    server.wait_for_version(version)
                    served_at = time.time()
                    staleness += [served_at - t for t in pending]
                    pending = []
                time.sleep(0.1)  # traffic arrives over time
            figures["staleness_s"] = round(float(np.mean(staleness)), 2) if staleness else None
            figures["staleness_max_s"] = round(float(np.max(staleness)), 2) if staleness else None
            figures["sync_interval_s"] = 10
        finally:
            server.stop()
    print(f"delta {figures['delta_bytes_ratio']:.2%} of a snapshot, publish {figures['publish_ms']} ms; "
          f"predict {figures['predict_per_s']:,}/s over HTTP ({figures['http_vs_inprocess']}x in-process), "
          f"p99 {figures['predict_p99_ms']} ms; staleness {figures['staleness_s']} s at a 10 s publish interval")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
