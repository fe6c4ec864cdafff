"""Bad-input fuzzing (issue 5) of both services, as real processes on 127.0.0.1: random bytes to every method,
messages whose fields carry the wrong wire types, valid messages with absurd values (huge numbers, NaN, empty,
non-UTF-8 text), and messages past the size limits. Every answer must be OK or a defined client-error status,
never UNKNOWN/INTERNAL; neither process may die; the next valid request must succeed.

Raw calls go through ``channel.unary_unary``/``unary_stream`` with identity serializers, so the servers see
exactly the bytes hypothesis made. The coordinator runs with ``--max-seq-len 24`` so that random requests that
happen to be valid generate at most a few tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import ServerProcess, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protos
from expert_workers import wire

pytestmark = pytest.mark.timeout(300)
cpb = protos.load("coordinator_pb2")
epb = wire.pb

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
"""What bad input may get. UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN and INTERNAL would mean we broke something."""
WORKER_METHODS = {"GetInfo": False, "FetchExpert": True, "GetExpertHandle": False, "GetStats": False}
COORDINATOR_METHODS = {"Generate": True, "GetStats": False}
FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def servers(tiny_ckpt: Path) -> Iterator[dict[str, ServerProcess]]:
    worker = start_server(["expert_workers", "serve", "--model", str(tiny_ckpt), "--shard", "0/1", "--port", "0",
                           "--expert-bits", "16", "--no-progress"])
    try:
        coordinator = start_server(["coordinator", "serve", "--model", str(tiny_ckpt), "--workers", worker.address,
                                    "--port", "0", "--device", "cpu", "--attn-bits", "16", "--max-seq-len", "24",
                                    "--max-queue", "4"],
                                   env={"OMP_NUM_THREADS": "1"})
        yield {"worker": worker, "coordinator": coordinator}
        assert coordinator.stop() == 0, "".join(coordinator.lines)
    finally:
        assert worker.stop() == 0, "".join(worker.lines)


@pytest.fixture(scope="module")
def channels(servers: dict[str, ServerProcess]) -> Iterator[dict[str, grpc.Channel]]:
    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    out = {name: grpc.insecure_channel(s.address, unlimited) for name, s in servers.items()}
    yield out
    for channel in out.values():
        channel.close()


def call(channel: grpc.Channel, service: str, method: str, streaming: bool, payload: bytes) -> grpc.StatusCode:
    """Sends raw bytes; returns the status (OK, or the error's code)."""
    path = f"/moe.v1.{service}/{method}"
    try:
        if streaming:
            for _ in channel.unary_stream(path)(payload, timeout=60):  # identity (de)serializers: raw bytes
                pass
        else:
            channel.unary_unary(path)(payload, timeout=60)
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, f"{method}({payload[:64]!r}...) -> {e.code().name}: {e.details()}"
        return e.code()
    return grpc.StatusCode.OK


def alive(servers: dict[str, ServerProcess], channels: dict[str, grpc.Channel]) -> None:
    """Both processes still run and answer a valid request correctly."""
    for name, server in servers.items():
        assert server.proc.poll() is None, f"{name} died:\n{''.join(server.lines[-30:])}"
    chunks = list(wire.pb_grpc.ExpertServiceStub(channels["worker"]).FetchExpert(
        epb.FetchExpertRequest(key=epb.ExpertKey(layer=1, expert=3)), timeout=30))
    assert chunks[0].total_bytes == sum(len(c.data) for c in chunks) > 0
    stub = protos.load("coordinator_pb2_grpc").CoordinatorServiceStub(channels["coordinator"])
    out = list(stub.Generate(cpb.GenerateRequest(prompt_token_ids=[1, 2, 3], max_new_tokens=3), timeout=60))
    assert sum(m.has_token for m in out) == 3 and out[-1].finish_reason == "length"


# ---- wire-level junk: fields with the wrong wire type, truncated varints, unknown fields ------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def wire_fields(draw: Any) -> bytes:
    """A protobuf-looking message: known and unknown field numbers with any wire type and any payload."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        number = draw(st.one_of(st.integers(1, 8), st.integers(1, 2**29 - 1)))
        kind = draw(st.sampled_from([0, 1, 2, 5]))
        if kind == 0:
            payload = _varint(draw(st.integers(0, 2**64 - 1)))
        elif kind == 1:
            payload = draw(st.binary(min_size=8, max_size=8))
        elif kind == 5:
            payload = draw(st.binary(min_size=4, max_size=4))
        else:
            body = draw(st.one_of(st.binary(max_size=64), wire_fields()))
            payload = _varint(len(body)) + body
        parts.append(_varint(number << 3 | kind) + payload)
    junk = b"".join(parts)
    if draw(st.booleans()):
        junk = junk[:draw(st.integers(0, len(junk)))]  # cut anywhere, e.g. inside a varint
    return junk


# ---- structurally valid messages with absurd values ---------------------------------------------------------
DOUBLES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 5e-324, 1e-320,
                                                                                     1e308, 1.0, 0.5]))


@st.composite
def generate_requests(draw: Any) -> bytes:
    req = cpb.GenerateRequest(prompt=draw(st.text(max_size=200)),
                              prompt_token_ids=draw(st.lists(st.integers(0, 2**32 - 1), max_size=30)),
                              temperature=draw(DOUBLES))
    if draw(st.booleans()):
        req.max_new_tokens = draw(st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(1, 4)))
    if draw(st.booleans()):
        req.top_p = draw(DOUBLES)
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**64 - 1))
    return req.SerializeToString()


@st.composite
def expert_requests(draw: Any) -> tuple[str, bytes]:
    key = epb.ExpertKey(layer=draw(st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1))),
                        expert=draw(st.one_of(st.integers(0, 9), st.integers(0, 2**32 - 1))))
    if draw(st.booleans()):
        return "GetExpertHandle", epb.GetHandleRequest(key=key).SerializeToString()
    req = epb.FetchExpertRequest(chunk_bytes=draw(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**17))))
    if draw(st.booleans()):
        req.key.CopyFrom(key)
    return "FetchExpert", req.SerializeToString()


def test_random_bytes_to_every_method(servers: dict[str, ServerProcess], channels: dict[str, grpc.Channel]) -> None:
    seen: set[grpc.StatusCode] = set()

    @FUZZ
    @given(data=st.one_of(st.binary(max_size=300), wire_fields()), pick=st.integers(0, 5))
    def fuzz(data: bytes, pick: int) -> None:
        targets = [("worker", "ExpertService", m, s) for m, s in WORKER_METHODS.items()]
        targets += [("coordinator", "CoordinatorService", m, s) for m, s in COORDINATOR_METHODS.items()]
        name, service, method, streaming = targets[pick]
        seen.add(call(channels[name], service, method, streaming, data))

    fuzz()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen  # the junk did reach the parsers
    alive(servers, channels)


def test_absurd_values_in_valid_messages(servers: dict[str, ServerProcess], channels: dict[str, grpc.Channel]) -> None:
    seen: set[grpc.StatusCode] = set()

    @FUZZ
    @given(request=generate_requests())
    def fuzz_generate(request: bytes) -> None:
        seen.add(call(channels["coordinator"], "CoordinatorService", "Generate", True, request))

    @FUZZ
    @given(request=expert_requests())
    def fuzz_experts(request: tuple[str, bytes]) -> None:
        method, payload = request
        seen.add(call(channels["worker"], "ExpertService", method, WORKER_METHODS[method], payload))

    fuzz_generate()
    fuzz_experts()
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND} <= seen
    alive(servers, channels)


def test_oversized_and_degenerate_messages(servers: dict[str, ServerProcess],
                                           channels: dict[str, grpc.Channel]) -> None:
    coordinator, worker = channels["coordinator"], channels["worker"]
    cases = [  # (channel, service, method, streaming, payload, expected)
        (coordinator, "CoordinatorService", "Generate", True, b"\x0a" + _varint(17 * 2**20) + b"a" * (17 * 2**20),
         grpc.StatusCode.RESOURCE_EXHAUSTED),  # past the 16 MiB message limit
        (worker, "ExpertService", "FetchExpert", True, b"\x0a" + _varint(65 * 2**20) + b"\x08" * (65 * 2**20),
         grpc.StatusCode.RESOURCE_EXHAUSTED),  # past the 64 MiB message limit
        (coordinator, "CoordinatorService", "Generate", True,
         cpb.GenerateRequest(prompt="ab" * (7 * 2**20)).SerializeToString(),  # 14 MiB of text: refused untokenized
         grpc.StatusCode.INVALID_ARGUMENT),
        (coordinator, "CoordinatorService", "Generate", True,
         cpb.GenerateRequest(prompt_token_ids=[5] * 2_000_000).SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT),
        (coordinator, "CoordinatorService", "Generate", True,
         b"\x0a\x04\xff\xfe\xfd\xfc", grpc.StatusCode.INVALID_ARGUMENT),  # a prompt that is not UTF-8
        (coordinator, "CoordinatorService", "Generate", True, b"", grpc.StatusCode.INVALID_ARGUMENT),  # empty
        (coordinator, "CoordinatorService", "Generate", True,
         cpb.GenerateRequest(prompt_token_ids=[1], max_new_tokens=2, temperature=1e-320, seed=2**64 - 1,
                             top_p=5e-324).SerializeToString(), grpc.StatusCode.OK),
        (coordinator, "CoordinatorService", "Generate", True,
         cpb.GenerateRequest(prompt_token_ids=[1], temperature=math.nan).SerializeToString(),
         grpc.StatusCode.INVALID_ARGUMENT),
        (worker, "ExpertService", "FetchExpert", True,
         epb.FetchExpertRequest(key=epb.ExpertKey(layer=0, expert=0), chunk_bytes=2**32 - 1).SerializeToString(),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for channel, service, method, streaming, payload, expected in cases:
        assert call(channel, service, method, streaming, payload) == expected, (method, payload[:40])
    with pytest.raises(grpc.RpcError) as info:  # a method that does not exist
        channels["worker"].unary_unary("/moe.v1.ExpertService/Explode")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    alive(servers, channels)
