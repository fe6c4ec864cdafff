"""``LocalRay``: a private Ray head on 127.0.0.1 that is stopped without touching any other Ray on the machine.

``ray stop`` kills every Ray process the user can signal, so it is never used here. Instead the head runs as
``ray start --head --block`` in its own session: terminating that one process shuts down exactly the
processes it started (and the detached actors living in them). Its ports are free ones, its temp dir is
private, and it gets its own random Ray auth token (``RAY_AUTH_MODE=token``), passed to every command that
talks to it through ``env``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRay:
    """A single-node Ray cluster bound to loopback; a context manager (``with LocalRay(...) as ray_:``)."""

    def __init__(self, expert_host: float = 8, num_cpus: int | None = None, dashboard: bool = False) -> None:
        self.expert_host = expert_host
        self.num_cpus = num_cpus
        self.dashboard = dashboard
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Short path: Ray's unix sockets live under it (108-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="moe-ray-", dir="/tmp"))
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": self.address,
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        self._proc: subprocess.Popen[str] | None = None
        self._lines: deque[str] = deque(maxlen=200)

    def command(self) -> list[str]:
        """The ``ray start`` command line."""
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               f"--temp-dir={self.temp_dir}", f"--resources={json.dumps({'expert_host': self.expert_host})}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               "--disable-usage-stats"]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        cmd += [f"--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"] if self.dashboard else \
            ["--include-dashboard=false"]
        return cmd

    def start(self, timeout_s: float = 120.0) -> LocalRay:
        """Starts the head and waits until it accepts drivers."""
        self._proc = subprocess.Popen(self.command(), env=self.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True)
        ready = threading.Event()

        def pump() -> None:
            assert self._proc is not None and self._proc.stdout is not None
            for line in self._proc.stdout:
                self._lines.append(line)
                if "block forever" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout_s) or self._proc.poll() is not None:
            output = "".join(self._lines)
            self.stop()
            raise RuntimeError(f"ray start failed:\n{output}")
        return self

    def pids(self) -> list[int]:
        """The head's process and everything below it (to check nothing is left behind)."""
        import psutil

        if self._proc is None:
            return []
        try:
            root = psutil.Process(self._proc.pid)
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float = 60.0) -> list[int]:
        """Stops the head and all its processes; returns the pids that were still alive afterwards and had
        to be killed (empty when the shutdown was clean)."""
        import psutil

        survivors: list[int] = []
        if self._proc is not None and self._proc.poll() is None:
            procs = [psutil.Process(p) for p in self.pids() if psutil.pid_exists(p)]
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            _, alive = psutil.wait_procs(procs, timeout=15)
            for p in alive:
                survivors.append(p.pid)
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return survivors

    def __enter__(self) -> LocalRay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
