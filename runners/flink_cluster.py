"""A standalone Flink cluster from the PyFlink wheel's own ``bin/``, on loopback.

``StandaloneCluster`` writes a configuration (free ports, logs and pid files in its own
directory, never inside the installed package), starts one JobManager and one TaskManager in a
new process group, waits until the TaskManager has registered, and stops the whole group by its
id. For tests and for trying ``--flink-master`` locally; a production cluster is the user's.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from serving.process import free_port


def flink_home() -> Path:
    import pyflink

    return Path(pyflink.__file__).parent


class StandaloneCluster:
    def __init__(self, work_dir: str | Path, slots: int = 2):
        self.dir = Path(work_dir)
        self.rest_port, self.rpc_port = free_port(), free_port()
        self.slots = slots
        self.processes: list[subprocess.Popen] = []

    @property
    def master(self) -> str:
        return f"127.0.0.1:{self.rest_port}"

    def _environment(self) -> dict:
        home = flink_home()
        conf = self.dir / "conf"
        if not conf.exists():
            shutil.copytree(home / "conf", conf)
            text = (conf / "config.yaml").read_text()
            text = text.replace("port: 6123", f"port: {self.rpc_port}")
            text = text.replace("numberOfTaskSlots: 1", f"numberOfTaskSlots: {self.slots}")
            text += f"\nrest.port: {self.rest_port}\nrest.bind-port: '{self.rest_port}'\n" \
                    f"taskmanager.rpc.port: '{free_port()}'\ntaskmanager.data.port: {free_port()}\n" \
                    f"blob.server.port: '{free_port()}'\n"
            (conf / "config.yaml").write_text(text)
        for sub in ("log", "pid"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        return {**os.environ, "FLINK_HOME": str(home), "FLINK_CONF_DIR": str(conf),
                "FLINK_LOG_DIR": str(self.dir / "log"), "FLINK_PID_DIR": str(self.dir / "pid")}

    def start(self, timeout_s: float = 120) -> "StandaloneCluster":
        env = self._environment()
        for script in ("jobmanager.sh", "taskmanager.sh"):
            # start-foreground keeps the JVM as this process (no daemonising), in a group of its own
            process = subprocess.Popen(["bash", str(flink_home() / "bin" / script), "start-foreground"], env=env,
                                       cwd=self.dir, start_new_session=True, stdout=open(self.dir / "log" / f"{script}.out", "w"),
                                       stderr=subprocess.STDOUT)
            self.processes.append(process)
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.master}/overview", timeout=2) as response:
                    if json.load(response).get("taskmanagers", 0) >= 1:
                        return self
            except OSError:
                pass
            if time.time() > deadline or any(p.poll() is not None for p in self.processes):
                self.stop()
                raise RuntimeError(f"the Flink cluster did not come up; logs in {self.dir / 'log'}")
            time.sleep(0.5)

    def jobs(self) -> list[dict]:
        with urllib.request.urlopen(f"http://{self.master}/jobs/overview", timeout=5) as response:
            return json.load(response)["jobs"]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes = []

    def __enter__(self) -> "StandaloneCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
