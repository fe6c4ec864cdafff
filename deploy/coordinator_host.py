"""``CoordinatorHost``: a detached Ray actor that runs and supervises ``python -m coordinator serve``.

The coordinator is the documented CLI process, not code inside the actor: the actor starts it, waits for its
``coordinator serving on HOST:PORT`` line, restarts it if it dies, and holds the deployment's state (spec,
generation, worker actors) so ``status``/``scale``/``down`` can find it by name. The coordinator finds the
current generation's worker actors itself (``--ray ... --ray-actor-prefix expert-worker-gG-``), so a worker
that Ray restarts on a new port is found again.

Switching to new workers (``scale``) starts a second coordinator on the same port (gRPC servers set
SO_REUSEPORT), waits until it serves, then stops the old one with a grace period: no moment without a server,
in-flight requests finish on the old one. If the port cannot be shared, the old one stops first.

The coordinator process dies with the actor: it gets SIGTERM when the thread that started it (which lives as
long as the process) goes away (Linux ``PR_SET_PDEATHSIG``), so ``ray stop`` / ``ray.kill`` leave nothing behind.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from deploy.spec import DeploySpec

log = logging.getLogger(__name__)
READY = re.compile(r"coordinator serving on (\S+:\d+)")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent's spawning thread exits."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the actor's stop() still terminates it
        pass


class CoordinatorProcess:
    """One ``python -m coordinator serve`` child: its output pump, readiness and exit."""

    def __init__(self, args: list[str], env: dict[str, str], log_lines: int = 400) -> None:
        self.args = args
        self.lines: collections.deque[str] = collections.deque(maxlen=log_lines)
        self.address: str | None = None
        self.ready = threading.Event()
        self.exited = threading.Event()
        self.proc: subprocess.Popen[str] | None = None
        started = threading.Event()
        # The spawning thread also pumps the output, so it lives exactly as long as the child (PDEATHSIG).
        threading.Thread(target=self._run, args=(env, started), daemon=True, name="coordinator-proc").start()
        started.wait()

    def _run(self, env: dict[str, str], started: threading.Event) -> None:
        try:
            self.proc = subprocess.Popen([sys.executable, "-u", "-m", "coordinator", *self.args], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         preexec_fn=_die_with_parent)
        except OSError as e:
            self.lines.append(f"could not start the coordinator: {e}")
            self.exited.set()
            return
        finally:
            started.set()
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            print(line, end="", flush=True)  # to the actor's log (ray logs)
            if not self.ready.is_set() and (m := READY.search(line)):
                self.address = m.group(1)
                self.ready.set()
        self.proc.wait()
        self.exited.set()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def wait_ready(self, timeout_s: float) -> str:
        """The serving address; raises RuntimeError (with the process output) if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.2):
            if self.exited.is_set() or time.monotonic() > deadline:
                if not self.exited.is_set():
                    self.stop(5.0)
                what = "exited" if self.proc and self.proc.returncode is not None else "timed out"
                raise RuntimeError(f"coordinator {what} before serving:\n" + "\n".join(list(self.lines)[-40:]))
        assert self.address is not None
        return self.address

    def stop(self, grace_s: float) -> None:
        """SIGTERM (the coordinator drains in-flight requests), SIGKILL after ``grace_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class CoordinatorHost:
    """Runs the deployment's coordinator and remembers what it serves. Methods are called by ``deploy``."""

    def __init__(self, spec: DeploySpec, device: str) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.spec = spec
        self.device = device
        self.generation = 0
        self.worker_names: list[str] = []
        self.worker_addresses: list[str] = []
        self.port = spec.port
        self.restarts = 0
        self._proc: CoordinatorProcess | None = None
        self._lock = threading.RLock()
        self._stopping = False
        threading.Thread(target=self._watch, daemon=True, name="coordinator-watch").start()

    def _env(self) -> dict[str, str]:
        """The coordinator joins this cluster as a Ray driver (worker discovery): same node IP, loopback
        binding and authentication mode as this actor."""
        import ray

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        node_ip = ray.util.get_node_ip_address()
        env["RAY_NODE_IP_ADDRESS"] = node_ip
        if node_ip.startswith("127."):
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        try:
            from ray._raylet import AuthenticationMode, get_authentication_mode

            if "RAY_AUTH_MODE" not in env and get_authentication_mode() == AuthenticationMode.TOKEN:
                env["RAY_AUTH_MODE"] = "token"  # an explicit address does not turn it on by itself
        except ImportError:  # a Ray without token authentication
            pass
        return env

    def _spawn(self, generation: int, timeout_s: float) -> CoordinatorProcess:
        import ray

        gcs = ray.get_runtime_context().gcs_address
        args = self.spec.coordinator_args(gcs, generation, self.port, self.device)
        proc = CoordinatorProcess(args, self._env())
        address = proc.wait_ready(timeout_s)
        self.port = int(address.rsplit(":", 1)[1])  # --port 0 resolved: later restarts keep it
        return proc

    def start(self, spec: DeploySpec, generation: int, names: list[str], addresses: list[str],
              timeout_s: float) -> dict[str, Any]:
        """Serves with these workers: starts the coordinator, or switches a running one over to them (a new
        process on the same port first, then the old one stops). Returns ``state()``."""
        with self._lock:
            old = self._proc
            self.spec = spec
            try:
                new = self._spawn(generation, timeout_s)
            except RuntimeError as e:
                bind_failed = "address already in use" in str(e).lower() or "bind" in str(e)
                if old is None or not bind_failed:
                    raise
                log.warning("port %d cannot be shared; stopping the old coordinator first", self.port)
                old.stop(30.0)
                old = None
                new = self._spawn(generation, timeout_s)
            self._proc = new
            self.generation, self.worker_names, self.worker_addresses = generation, names, addresses
        if old is not None:
            old.stop(30.0)
        return self.state()

    def _watch(self) -> None:
        """Restarts a coordinator that died on its own (with backoff), with the current workers."""
        backoff = 1.0
        while True:
            time.sleep(1.0)
            with self._lock:
                proc = self._proc
                if self._stopping or proc is None or not proc.exited.is_set():
                    if proc is not None and proc.ready.is_set():
                        backoff = 1.0
                    continue
                log.error("coordinator exited (%s); restarting in %.0fs", proc.proc and proc.proc.returncode,
                          backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 60.0)
            with self._lock:
                if self._stopping or self._proc is not proc:
                    continue
                self.restarts += 1
                generation = self.generation
            try:  # outside the lock: state() keeps answering while it loads
                new = self._spawn(generation, self.spec.ready_timeout_s)
            except RuntimeError as e:
                log.error("%s", e)
                continue
            with self._lock:
                if self._stopping or self._proc is not proc:
                    new.stop(30.0)  # stopped or switched meanwhile
                else:
                    self._proc = new

    def state(self) -> dict[str, Any]:
        """Spec, generation, workers, and the coordinator process (address, pid, node, restarts)."""
        import ray

        with self._lock:
            proc = self._proc
            running = proc is not None and not proc.exited.is_set()
            return {"spec": asdict(self.spec), "generation": self.generation, "worker_names": list(self.worker_names),
                    "worker_addresses": list(self.worker_addresses), "device": self.device,
                    "address": proc.address if proc else None, "pid": proc.pid if running and proc else None,
                    "running": running, "restarts": self.restarts,
                    "node_id": ray.get_runtime_context().get_node_id(), "host_pid": os.getpid()}

    def logs(self, lines: int = 100) -> list[str]:
        """The coordinator's last output lines."""
        with self._lock:
            return list(self._proc.lines)[-lines:] if self._proc else []

    def stop(self, grace_s: float = 30.0) -> None:
        """Stops the coordinator for good (the actor can then be killed)."""
        with self._lock:
            self._stopping = True
            proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop(grace_s)
