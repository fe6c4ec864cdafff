"""Shared fixtures: a per-session cache dir, tiny checkpoints, and real server processes on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
READY = re.compile(r"serving on (\S+:\d+)")

# Ray must never bind the machine's external interface in tests.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session", autouse=True)
def moe_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session builds models and quantization caches in its own directory."""
    path = tmp_path_factory.mktemp("moe-cache")
    os.environ["MOE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(moe_cache_dir: Path) -> Path:
    """The ``tiny-random`` checkpoint (Mixtral's w1/w2/w3 layout, one safetensors file, tokenizer)."""
    from modelzoo import resolve_model

    return resolve_model("tiny-random")


@dataclass
class ServerProcess:
    """A server started with ``--port 0``; ``address`` is what it printed once ready."""

    proc: subprocess.Popen[str]
    address: str
    lines: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_server(args: Sequence[str], timeout: float = 180.0, env: dict[str, str] | None = None) -> ServerProcess:
    """Runs ``python -m <args>`` and waits for its ``serving on HOST:PORT`` line (output is echoed to the
    test log). Raises with the process output if it exits or times out first."""
    cmd = [sys.executable, "-u", "-m", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    lines: list[str] = []
    found: list[str] = []
    done = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not found and (m := READY.search(line)):
                found.append(m.group(1))
                done.set()
        done.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not done.wait(0.2):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{' '.join(args)} not ready in {timeout}s:\n{''.join(lines)}")
    if not found:
        proc.wait(10)
        raise RuntimeError(f"{' '.join(args)} exited ({proc.returncode}) before serving:\n{''.join(lines)}")
    return ServerProcess(proc, found[0], lines)


@pytest.fixture
def spawn_server() -> Iterator:
    """``spawn_server([...module args...])`` -> ServerProcess; every process is stopped after the test."""
    started: list[ServerProcess] = []

    def spawn(args: Sequence[str], **kw: object) -> ServerProcess:
        server = start_server(args, **kw)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield spawn
    for server in started:
        server.stop()


def spawn_workers(ckpt: Path, n: int, extra: Sequence[str] = (), replicas: int = 1) -> list[ServerProcess]:
    """Starts ``n`` shards x ``replicas`` expert workers on 127.0.0.1 (caller stops them)."""
    servers: list[ServerProcess] = []
    try:
        for replica in range(replicas):
            for i in range(n):
                servers.append(start_server(["expert_workers", "serve", "--model", str(ckpt), "--shard",
                                             f"{i}/{n}", "--port", "0", "--replica", str(replica), *extra]))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers
