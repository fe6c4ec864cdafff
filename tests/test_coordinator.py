"""The coordinator as users run it: real expert worker processes (2 shards, --expert-bits 16) and a real
``python -m coordinator serve`` process on 127.0.0.1, driven with raw gRPC stubs."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import protos
from conftest import ServerProcess
from coordinator import Coordinator, CoordinatorConfig, GenerateParams
from coordinator.discovery import connect
from coordinator.reference import greedy, reference_model

pb = protos.load("coordinator_pb2")
pb_grpc = protos.load("coordinator_pb2_grpc")
INTERFACE_KEYS = {"prompt_tokens", "generated_tokens", "ttft_ms", "decode_tokens_per_s", "expert_uses",
                  "cache_hits", "cache_misses", "prefetch_issued", "prefetch_used", "bytes_fetched",
                  "remote_compute_calls", "gpu_peak_bytes"}
PROMPTS = [[5, 9, 33, 70, 100], [200, 3, 4], list(range(10, 40)), [42]]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workers(exact_workers: list[ServerProcess]) -> list[ServerProcess]:
    """The session's 2 exact worker processes (conftest), which test_client's coordinator also reads."""
    return exact_workers


@pytest.fixture(scope="module")
def coordinator(exact_coordinator: Callable[[], ServerProcess]) -> ServerProcess:
    """The session's coordinator process in front of ``workers`` (conftest: ``--experts-per-layer 1 --prefetch 2
    --max-queue 8``), which test_client also drives."""
    return exact_coordinator()


@pytest.fixture(scope="module")
def stub(coordinator: ServerProcess) -> Iterator[Any]:
    channel = grpc.insecure_channel(coordinator.address)
    yield pb_grpc.CoordinatorServiceStub(channel)
    channel.close()


def run(stub: Any, **request: Any) -> tuple[list[int], str, Any]:
    """Generate -> (token ids, concatenated text, final message)."""
    msgs = list(stub.Generate(pb.GenerateRequest(**request), timeout=120))
    final = msgs[-1]
    assert final.finish_reason in ("stop", "length") and all(not m.finish_reason for m in msgs[:-1])
    return [m.token_id for m in msgs if m.has_token], "".join(m.text for m in msgs), final


def test_health_serving_and_stats(coordinator: ServerProcess, stub: Any) -> None:
    channel = grpc.insecure_channel(coordinator.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "moe.v1.CoordinatorService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    assert coordinator.address.startswith("127.0.0.1:")
    stats = stub.GetStats(pb.StatsRequest(), timeout=10).stats
    assert INTERFACE_KEYS <= set(stats) and {"hit_rate", "prefetch_recall", "requests"} <= set(stats)


def test_greedy_over_grpc_equals_transformers(tiny_ckpt: Path, stub: Any) -> None:
    """Experts spread over two worker processes, k=1, prefetch on: token ids equal transformers' generate."""
    reference = reference_model(tiny_ckpt)
    for prompt in PROMPTS:
        ids, _, final = run(stub, prompt_token_ids=prompt, max_new_tokens=12)
        assert ids == greedy(reference, prompt, 12), prompt
        s = final.stats
        assert INTERFACE_KEYS <= set(s) and s["generated_tokens"] == len(ids) and s["prompt_tokens"] == len(prompt)
        assert s["expert_uses"] == s["cache_hits"] + s["cache_misses"] and s["cache_misses"] > 0
        assert 0 <= s["prefetch_used"] <= s["prefetch_issued"] and s["bytes_fetched"] > 0
        assert s["ttft_ms"] > 0 and s["remote_compute_calls"] == 0


@pytest.mark.parametrize(("k", "prefetch", "zero_copy"), [(8, 0, False), (1, 0, True), (2, 2, False)])
def test_remote_source_paths_exact(tiny_ckpt: Path, workers: list[ServerProcess], k: int, prefetch: int,
                                   zero_copy: bool) -> None:
    """The same two worker processes read through gRPC streaming (staging, fetch threads) or their shared
    memory (zero-copy views), with an engine in this process."""
    source = connect([w.address for w in workers], None, 60, prefer_zero_copy=zero_copy)
    engine = Coordinator(tiny_ckpt, source, CoordinatorConfig(attn_bits=16, experts_per_layer=k,
                                                                prefetch=prefetch, zero_copy=zero_copy))
    reference = reference_model(tiny_ckpt)
    # zero-copy: every expert was mapped and checksummed at start, before any decode step needs it
    assert source.stats()["zero_copy_verified_ahead"] == (len(engine.runner.manifests) if zero_copy else 0)
    try:
        for prompt in PROMPTS[:3]:
            events = engine.generate(GenerateParams(prompt_token_ids=tuple(prompt), max_new_tokens=12))
            assert [e.token_id for e in events[:-1]] == greedy(reference, prompt, 12), prompt
        counters = source.stats()
        assert (counters["zero_copy_reads"] > 0) == zero_copy
        assert (counters["grpc_fetches"] > 0) == (not zero_copy)
    finally:
        engine.close()
        source.close()


def test_text_prompt_streams_incremental_text(tiny_ckpt: Path, stub: Any) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    prompt = "Grüße, world: ünïcödé → ok"
    ids, text, final = run(stub, prompt=prompt, max_new_tokens=20, temperature=0.0)
    assert final.stats["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    by_ids, _, _ = run(stub, prompt_token_ids=tokenizer(prompt)["input_ids"], max_new_tokens=20)
    assert by_ids == ids


def test_sampling_is_seeded(stub: Any) -> None:
    a, _, _ = run(stub, prompt_token_ids=[1, 2, 3], max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    b, _, _ = run(stub, prompt_token_ids=[1, 2, 3], max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    c, _, _ = run(stub, prompt_token_ids=[1, 2, 3], max_new_tokens=10, temperature=1.5, top_p=0.9, seed=8)
    greedy_ids, _, _ = run(stub, prompt_token_ids=[1, 2, 3], max_new_tokens=10)
    assert a == b and (a != c or a != greedy_ids)


@pytest.mark.parametrize(("request_fields", "fragment"), [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt_token_ids": [1, 2], "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt_token_ids": [1, 2], "max_new_tokens": -3}, "max_new_tokens"),
    ({"prompt_token_ids": [1] * 200, "max_new_tokens": 57}, "positions"),
    ({"prompt_token_ids": [1, 2], "temperature": math.nan}, "temperature"),
    ({"prompt_token_ids": [1, 2], "temperature": math.inf}, "temperature"),
    ({"prompt_token_ids": [1, 2], "temperature": -0.5}, "temperature"),
    ({"prompt_token_ids": [1, 2], "top_p": 0.0}, "top_p"),
    ({"prompt_token_ids": [1, 2], "top_p": 1.5}, "top_p"),
    ({"prompt_token_ids": [1, 10**6]}, "vocabulary"),
])
def test_bad_input_is_invalid_argument(stub: Any, request_fields: dict[str, Any], fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(**request_fields), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()
    ids, _, _ = run(stub, prompt_token_ids=[1] * 200, max_new_tokens=56)  # exactly at the limit: fine
    assert len(ids) <= 56


def test_device_memory_exhausted_maps_to_resource_exhausted() -> None:
    """A CUDA out-of-memory error under a capped allocator (``cap_device_memory``) fails its request with
    RESOURCE_EXHAUSTED, like a full queue, not INTERNAL; a plain RuntimeError stays INTERNAL."""
    from coordinator import wire

    assert wire.status_of(torch.cuda.OutOfMemoryError("CUDA out of memory")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert wire.status_of(RuntimeError("CUDA error")) == grpc.StatusCode.INTERNAL


def test_concurrent_clients_get_their_own_tokens(stub: Any) -> None:
    alone = {i: run(stub, prompt_token_ids=p, max_new_tokens=10)[0] for i, p in enumerate(PROMPTS)}
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            results[i] = run(stub, prompt_token_ids=PROMPTS[i % len(PROMPTS)], max_new_tokens=10)[0]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert all(results[i] == alone[i % len(PROMPTS)] for i in range(6))


def test_cancel_stops_the_decode(stub: Any) -> None:
    before = stub.GetStats(pb.StatsRequest(), timeout=10).stats
    call = stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2, 3], max_new_tokens=250), timeout=120)
    for _, _ in zip(range(3), call):
        pass
    call.cancel()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = stub.GetStats(pb.StatsRequest(), timeout=10).stats
        if now["requests_cancelled"] > before["requests_cancelled"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the cancelled request kept decoding")
    assert now["requests"] == before["requests"]  # it never completed
    ids, _, _ = run(stub, prompt_token_ids=[4, 5], max_new_tokens=3)  # and the server still serves
    assert len(ids) == 3


def test_sigterm_stops_cleanly(coordinator: ServerProcess) -> None:
    """Runs last in this module: the shared coordinator exits 0 on SIGTERM."""
    assert coordinator.stop() == 0
