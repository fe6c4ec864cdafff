"""Replica failover under Ray (issue 5), on a real local Ray bound to 127.0.0.1: an expert worker actor's process is
SIGKILLed mid-generation; the request completes with the no-fault tokens; Ray restarts the actor (max_restarts),
it listens on a new port, reports NOT_SERVING while it reloads from the on-disk cache (verifying checksums and
repairing what fails them), and the coordinator's source finds it at its new address and uses it again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator import Coordinator, CoordinatorConfig, GenerateParams, TokenEvent
from coordinator.discovery import connect
from coordinator.reference import greedy, reference_model
from expert_workers import wire
from expert_workers.fetch import RemoteSource

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
NAMESPACE = "moe-reliability"


def health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME), timeout=5).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def replica0(source: RemoteSource) -> dict[str, Any]:
    return next(r for r in source.replicas() if r["replica"] == 0)


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s}s"
        time.sleep(0.2)


def restarted_pid(actor: Any, old: int, timeout_s: float) -> int:
    """The actor's pid once Ray has restarted it (calls fail or wait while it is down)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid = ray.get(actor.pid.remote(), timeout=20)
            if pid != old:
                return int(pid)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError("Ray did not restart the actor")


def test_killed_actor_is_restarted_reloads_verified_and_used_again(local_ray: None, tiny_ckpt: Path,
                                                                    tmp_path: Path) -> None:
    from expert_workers.actor import start_expert_worker
    from expert_workers.server import ServerConfig
    from expert_workers.service import FaultInjection

    gate = tmp_path / "hold-load"  # while it exists, a (re)starting worker stays NOT_SERVING
    cache = tmp_path / "cache"  # this test's own quantized cache: corrupting it touches nothing else
    config = ServerConfig(fault=FaultInjection(hold_load_while=str(gate)))
    actors = [start_expert_worker(str(tiny_ckpt), "0/1", bits=16, replica=r, cache_dir=str(cache), server=config,
                                  name=f"rel-worker-{r}", namespace=NAMESPACE, max_restarts=2) for r in range(2)]
    source = connect(None, "auto", 240, {"prefix": "rel-worker", "namespace": NAMESPACE}, timeout_s=10)
    assert isinstance(source, RemoteSource)
    engine = Coordinator(tiny_ckpt, source, CoordinatorConfig(attn_bits=16, experts_per_layer=1, prefetch=1))
    try:
        prompt, n = [5, 9, 33, 70], 40
        params = GenerateParams(prompt_token_ids=tuple(prompt), max_new_tokens=n)
        no_fault = [e.token_id for e in engine.generate(params)[:-1]]
        assert no_fault == greedy(reference_model(tiny_ckpt), prompt, n)
        assert source.stats()["ray_reads"] > 0  # co-located: experts come zero-copy from the object store

        pid = ray.get(actors[0].pid.remote(), timeout=30)
        old_address = replica0(source)["address"]
        gate.touch()
        data = next(cache.glob("*/shard-0of1.data"))
        raw = bytearray(data.read_bytes())
        raw[100] ^= 0x55  # the restarted worker must catch this when it reloads (expert L0E0)
        data.write_bytes(raw)

        events: list[TokenEvent] = []

        def emit(event: TokenEvent) -> None:
            events.append(event)
            if len(events) == 1:
                os.kill(pid, signal.SIGKILL)  # mid-generation

        engine.run(params, list(prompt), emit)
        assert [e.token_id for e in events[:-1]] == no_fault
        # (Reads of the dead actor's objects may still succeed for a moment: immutable, still in the store.)

        restarted_pid(actors[0], pid, 120)
        address = ray.get(actors[0].address.remote(), timeout=30)
        assert address != old_address and address.startswith("127.0.0.1:")  # Ray restarted it on a new port
        assert health(address) == "NOT_SERVING"
        assert [e.token_id for e in engine.generate(params)[:-1]] == no_fault  # the other replica serves
        assert source.stats()["replicas_gone"] >= 1 and source.stats()["unavailable"] == 0
        assert not replica0(source)["healthy"]  # out of rotation while it loads

        gate.unlink()
        assert ray.get(actors[0].ready.remote(120), timeout=150)
        stats = ray.get(actors[0].stats.remote(), timeout=30)
        assert stats["cache_reused"] == 1 and stats["cache_repaired_experts"] == 1  # reloaded, checksums checked
        assert health(address) == "SERVING"
        wait_until(lambda: replica0(source)["healthy"], 30, "the source picking up the restarted actor")
        back = replica0(source)
        assert back["address"] == address and back["revivals"] == 1 and back["pid"] != pid
        assert [e.token_id for e in engine.generate(params)[:-1]] == no_fault
        assert replica0(source)["served"] > back["served"]  # used again
    finally:
        engine.close()
        source.close()
        for a in actors:
            ray.kill(a, no_restart=True)
