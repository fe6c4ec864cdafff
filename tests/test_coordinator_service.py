"""The gRPC service in this process around a real engine: overload, unreachable workers, shutdown, auth."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import protos
from conftest import spawn_workers
from coordinator import Coordinator, CoordinatorConfig
from coordinator.discovery import connect
from coordinator.server import RunningServer, serve
from expert_workers.format import EXACT
from expert_workers.security import SecurityConfig
from expert_workers.source import make_source
from expert_workers.store import ExpertStore

pb = protos.load("coordinator_pb2")
pb_grpc = protos.load("coordinator_pb2_grpc")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    store = ExpertStore(tiny_ckpt, "0/1", EXACT, cache_dir=tmp_path_factory.mktemp("x"), progress=False).load()
    engine = Coordinator(tiny_ckpt, make_source(stores=[store]), CoordinatorConfig(attn_bits=16, prefetch=2))
    yield engine
    engine.close()
    store.close()


def stub_for(server: RunningServer, token: str | None = None) -> Any:
    channel = grpc.insecure_channel(server.address)
    return pb_grpc.CoordinatorServiceStub(channel)


def test_full_queue_is_resource_exhausted_at_once(engine: Coordinator) -> None:
    server = serve(engine, max_queue=1)
    try:
        stub = stub_for(server)
        running = stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2], max_new_tokens=200), timeout=60)
        next(running)  # the long request is decoding
        queued = stub.Generate(pb.GenerateRequest(prompt_token_ids=[3, 4], max_new_tokens=4), timeout=60)
        time.sleep(0.3)  # let it reach the queue
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt_token_ids=[5], max_new_tokens=4), timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in info.value.details()
        assert time.monotonic() - start < 2
        running.cancel()
        assert [m.has_token for m in queued][-1] is False  # the queued one then completes normally
        stats = stub.GetStats(pb.StatsRequest(), timeout=10).stats
        assert stats["requests_rejected"] >= 1
    finally:
        server.stop(grace_s=1)


def test_shutdown_fails_waiting_requests_with_unavailable(engine: Coordinator) -> None:
    server = serve(engine, max_queue=4)
    stub = stub_for(server)
    running = stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2], max_new_tokens=200), timeout=60)
    next(running)
    waiting = stub.Generate(pb.GenerateRequest(prompt_token_ids=[3, 4], max_new_tokens=4), timeout=60)
    time.sleep(0.3)
    server.scheduler.close()
    with pytest.raises(grpc.RpcError) as info:
        list(waiting)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as info:
        list(running)  # the running one is cancelled at its next step
    assert info.value.code() == grpc.StatusCode.CANCELLED
    server.stop(grace_s=1)


def test_token_auth_and_loopback_policy(engine: Coordinator) -> None:
    with pytest.raises(ValueError, match="non-loopback"):
        serve(engine, security=SecurityConfig(host="0.0.0.0"))
    server = serve(engine, security=SecurityConfig(host="127.0.0.1", token="s3cret"))
    try:
        stub = stub_for(server)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetStats(pb.StatsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stats = stub.GetStats(pb.StatsRequest(), timeout=10, metadata=[("authorization", "Bearer s3cret")])
        assert "expert_uses" in stats.stats
    finally:
        server.stop(grace_s=1)


def test_unreachable_workers_give_unavailable_quickly(tiny_ckpt: Path) -> None:
    worker = spawn_workers(tiny_ckpt, 1, ["--expert-bits", "16", "--no-progress"])[0]
    source = connect([worker.address], None, 60, prefer_zero_copy=False, timeout_s=5)
    engine = Coordinator(tiny_ckpt, source, CoordinatorConfig(attn_bits=16, experts_per_layer=1, prefetch=1,
                                                                zero_copy=False, fetch_timeout_s=5))
    server = serve(engine)
    try:
        stub = stub_for(server)
        ok = list(stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2], max_new_tokens=3), timeout=60))
        assert ok[-1].finish_reason == "length"
        worker.stop(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt_token_ids=[7, 8, 9], max_new_tokens=8), timeout=60))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 15
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # the server itself keeps serving
        stats = stub.GetStats(pb.StatsRequest(), timeout=10).stats
        assert stats["requests_failed"] >= 1
        engine.cache.check()
    finally:
        server.stop(grace_s=1)
        engine.close()
        source.close()
        worker.stop()
