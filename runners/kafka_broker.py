"""A Kafka-protocol broker of our own on loopback (tests, demos, ``bench.pipeline``): Tansu with
in-memory storage, on a free port, started in its own process group and stopped by that group's
id. Topics are created on first use (or by the producer, with its partition count).

Quirk: Tansu answers ListOffsets(latest) with a count of record batches, not of records, so a
consumer must not stop at "latest"; readers here stop at the offsets the producer reported."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from runners.kafka_assets import broker_binary
from serving.process import free_port


class KafkaBroker:
    def __init__(self, work_dir: str | Path):
        self.work_dir = Path(work_dir)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> "KafkaBroker":
        url = f"tcp://{self.bootstrap}"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.work_dir / "tansu.log", "wb")
        self.process = subprocess.Popen(
            [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the Kafka broker did not start on {self.bootstrap}: "
                                       f"{(self.work_dir / 'tansu.log').read_text(errors='replace')[-2000:]}")
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM to the broker's process group, SIGKILL after 2 s (it drains slowly)."""
        if self.process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 2), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None
