"""A ``redis-server`` of our own on loopback (tests, benchmarks, local runs): a free port, its
own directory, no persistence unless asked, started in its own process group and stopped by
that group's id. ``cluster=True`` starts it as a one-node Redis Cluster owning all 16384 slots.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from serving.process import free_port


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server; "
                                "macOS: brew install redis) or point the store at a running Redis")
    return binary


def _free_cluster_port() -> int:
    """A free loopback port P <= 55535 whose cluster bus port P + 10000 is free too."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20_000, 55_535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node on loopback")


class RedisServer:
    def __init__(self, directory: str | Path, cluster: bool = False, port: int | None = None,
                 persistent: bool = False):
        """``persistent``: an append-only file synced on every write, so a killed server comes
        back with its data."""
        self.directory, self.cluster, self.persistent = Path(directory), cluster, persistent
        self.port = port or (_free_cluster_port() if cluster else free_port())
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> "RedisServer":
        import redis

        self.directory.mkdir(parents=True, exist_ok=True)
        command = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                   "--save", "", "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
                   "--daemonize", "no", "--logfile", "redis.log"]
        if self.cluster:
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start; see {self.directory}/redis.log")
                time.sleep(0.05)
        if self.cluster:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis cluster on port {self.port} did not become ready")
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the server (its process group), at once."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()
