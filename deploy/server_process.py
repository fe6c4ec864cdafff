"""A server of this repo as a plain child process: ``python -m <module> serve ... --port 0``, ready once it
prints ``serving on HOST:PORT`` (both servers' ``__main__`` print that line when they bind).

What the benchmarks (``bench.system_bench``, ``bench.chaos``) and the tests start their expert workers and
coordinators with. ``deploy.coordinator_host`` keeps its own child: it runs inside a Ray actor, restarts the
coordinator and ties the child's life to the thread that spawned it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

READY = re.compile(r"serving on (\S+:\d+)")
REPO = Path(__file__).resolve().parents[1]


class ServerProcess:
    """One started server: its ``args`` (after ``python -m``), the ``proc``, the ``address`` it printed, and
    every line of its output so far (``lines``; also written to ``log_path`` when one was given)."""

    def __init__(self, args: Sequence[str], proc: subprocess.Popen[str], log: IO[str] | None = None) -> None:
        self.args, self.proc, self._log = list(args), proc, log
        self.address = ""
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._pumping = threading.Thread(target=self._pump, daemon=True, name=f"pump-{proc.pid}")
        self._pumping.start()

    @classmethod
    def start(cls, args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 180.0,
              log_path: Path | None = None) -> ServerProcess:
        """Runs ``python -u -m <args>`` from the repo root in its own session (so a signal to the test or
        bench does not reach it) with ``env`` (default: this process's), and waits for its address. Raises
        TimeoutError (the process killed) if none comes in ``timeout`` s, RuntimeError if it exits first; both
        with its output."""
        log = open(log_path, "w") if log_path is not None else None  # before the process: no orphan if it fails
        proc = subprocess.Popen([sys.executable, "-u", "-m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        server = cls(args, proc, log)
        deadline = time.monotonic() + timeout
        while not server._ready.wait(0.2):
            if time.monotonic() > deadline:
                server.stop(signal.SIGKILL)
                raise TimeoutError(f"{' '.join(args)} not ready in {timeout:g}s:\n{server.output()}")
        if not server.address:
            proc.wait(10)
            server.stop()
            raise RuntimeError(f"{' '.join(args)} exited ({proc.returncode}) before serving:\n{server.output()}")
        return server

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
            if not self.address and (m := READY.search(line)):
                self.address = m.group(1)
                self._ready.set()
        self._ready.set()  # exited: ``start`` stops waiting
        if self._log is not None:
            self._log.close()

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def output(self, last: int = 60) -> str:
        """The last ``last`` lines of its output."""
        return "".join(self.lines[-last:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Sends ``sig`` (servers stop gracefully on SIGTERM), kills it after ``timeout`` s; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._pumping.join(5)  # its last lines into ``lines`` and the log
        return self.proc.returncode
