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
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path


RAY_WORKER_PORTS_END = 19999
"""Ray's default ``--max-worker-port``: its worker processes listen at or below it (from 10002)."""


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports bound as port 0 and for outgoing connections (Linux: 32768-60999)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now that stays free until it is used: picked between Ray's worker ports
    and the kernel's ephemeral range, so neither a process binding port 0 (Ray starts many, between our pick
    and the bind) nor an outgoing connection can take it first. The ephemeral range when that gap is empty."""
    lo, hi = RAY_WORKER_PORTS_END + 1, ephemeral_ports()[0] - 1
    candidates = random.sample(range(lo, hi + 1), min(64, hi - lo + 1)) if hi > lo else []
    for port in [*candidates, 0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free TCP port on 127.0.0.1")


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
        self._nodes: list[subprocess.Popen[str]] = []

    def command(self) -> list[str]:
        """The ``ray start`` command line."""
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               f"--temp-dir={self.temp_dir}", f"--resources={json.dumps({'expert_host': self.expert_host})}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               "--disable-usage-stats"]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"] if self.dashboard else \
            ["--include-dashboard=false"]
        return cmd

    def _launch(self, cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Runs ``ray start ... --block`` and waits for it to say it is up."""
        proc = subprocess.Popen(cmd, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        ready = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self._lines.append(line)
                if "block forever" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout_s) or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{''.join(self._lines)}")
        return proc

    def start(self, timeout_s: float = 120.0) -> LocalRay:
        """Starts the head and waits until it accepts drivers."""
        try:
            self._proc = self._launch(self.command(), timeout_s)
        except RuntimeError:
            self.stop()
            raise
        return self

    def add_node(self, expert_host: float, num_cpus: int = 1, timeout_s: float = 120.0) -> None:
        """Joins another Ray node on 127.0.0.1 (its own raylet and object store), as
        ``ray start --address=HEAD --resources='{"expert_host": N}'`` does on another machine.

        ``ray start --address`` itself cannot join on loopback: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it
        refuses ("multi-node clusters are not supported"), without it it resolves 127.0.0.1 to the external
        interface. So the node is started the way ``ray.cluster_utils.Cluster.add_node`` does (``_node_main``)."""
        cmd = [sys.executable, "-u", "-m", "deploy.local_ray", self.address, str(self.temp_dir),
               json.dumps({"expert_host": expert_host}), str(num_cpus)]
        self._nodes.append(self._launch(cmd, timeout_s))

    def pids(self) -> list[int]:
        """The head's process and everything below it (to check nothing is left behind)."""
        import psutil

        pids: list[int] = []
        for proc in [*self._nodes, *([self._proc] if self._proc else [])]:
            try:
                root = psutil.Process(proc.pid)
                pids += [root.pid, *(p.pid for p in root.children(recursive=True))]
            except psutil.NoSuchProcess:
                pass
        return pids

    def stop(self, timeout_s: float = 60.0) -> list[int]:
        """Stops the head and all its processes; returns the pids that were still alive afterwards and had
        to be killed (empty when the shutdown was clean)."""
        import psutil

        survivors: list[int] = []
        procs = []
        for pid in self.pids():
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        # Worker nodes first, then the head: each `ray start --block` shuts down what it started.
        for proc in [*self._nodes, *([self._proc] if self._proc else [])]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            survivors.append(p.pid)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return survivors

    def __enter__(self) -> LocalRay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _node_main(gcs_address: str, temp_dir: str, resources: str, num_cpus: int) -> None:
    """A worker node on 127.0.0.1 (what ``ray.cluster_utils.Cluster.add_node`` starts), until SIGTERM."""
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        node_ip_address="127.0.0.1", gcs_address=gcs_address, temp_dir=temp_dir, num_cpus=num_cpus, num_gpus=0,
        resources=json.loads(resources), include_log_monitor=False, node_manager_port=0, min_worker_port=0,
        max_worker_port=0, dashboard_agent_listen_port=None)
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("node started; will block forever until terminated by a signal", flush=True)
    stop.wait()
    node.kill_all_processes(check_alive=False, allow_graceful=True)


if __name__ == "__main__":
    _node_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
