"""A ``streamrec serve`` process on loopback, started in its own process group and stopped by
its process-group id (for tests, benchmarks and scripts)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on loopback right now (for servers started by tests and scripts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServingProcess:
    """``streamrec serve`` in its own process group; stopped by process group id."""

    def __init__(self, model_dir: Path, *extra: str):
        import httpx

        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runners.cli", "serve", "--model-dir", str(model_dir), "--port", str(self.port),
             "--poll", "0.05", *extra], cwd=ROOT, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        deadline = time.time() + 60
        while True:
            try:
                self.client.get("/metrics")
                return
            except httpx.TransportError:
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"serving did not start: {self.process.stderr.read().decode()[-2000:]}")
                time.sleep(0.1)

    def wait_for_version(self, version: int, timeout: float = 20) -> dict:
        deadline = time.time() + timeout
        while True:
            status = self.client.get("/metrics").json()
            if status["version"] >= version or time.time() > deadline:
                return status
            time.sleep(0.02)

    def predict(self, records):
        return self.client.post("/predict", json={"impressions": records})

    def stop(self):
        self.client.close()
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
