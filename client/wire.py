"""The only client module that touches generated protobuf code: builds requests, reads responses.

Everything it returns is plain Python (ints, strings, dicts); ``client.client`` never sees a message type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import load

_pb2 = load("coordinator_pb2")
_pb2_grpc = load("coordinator_pb2_grpc")

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class WireToken:
    """One ``GenerateResponse`` in plain types."""

    has_token: bool
    token_id: int
    text: str
    finish_reason: str
    stats: dict[str, float]


class Stubs:
    """The coordinator and health stubs on one channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.coordinator = _pb2_grpc.CoordinatorServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


def generate_request(prompt: str, prompt_token_ids: list[int] | None, max_new_tokens: int | None,
                     temperature: float, top_p: float | None, seed: int | None) -> Any:
    """A ``GenerateRequest``; raises ValueError for values the wire types cannot carry (the server judges
    the rest, so its validation and status codes stay the single source of truth)."""
    ids = list(prompt_token_ids or [])
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= UINT32_MAX for t in ids):
        raise ValueError("prompt_token_ids must be non-negative integers below 2**32")
    if max_new_tokens is not None and not -INT32_MAX - 1 <= max_new_tokens <= INT32_MAX:
        raise ValueError(f"max_new_tokens={max_new_tokens} does not fit in int32")
    if seed is not None and not 0 <= seed <= UINT64_MAX:
        raise ValueError(f"seed={seed} must be an integer in [0, 2**64)")
    request = _pb2.GenerateRequest(prompt=prompt, prompt_token_ids=ids, temperature=float(temperature))
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    if top_p is not None:
        request.top_p = float(top_p)
    if seed is not None:
        request.seed = seed
    return request


def generate(stubs: Stubs, request: Any, timeout_s: float | None) -> tuple[grpc.Call, Iterator[WireToken]]:
    """Starts the server-streaming Generate call; returns the call (to cancel it) and its messages."""
    call = stubs.coordinator.Generate(request, timeout=timeout_s)

    def tokens() -> Iterator[WireToken]:
        for msg in call:
            yield WireToken(msg.has_token, msg.token_id, msg.text, msg.finish_reason, dict(msg.stats))

    return call, tokens()


def stats(stubs: Stubs, timeout_s: float | None) -> dict[str, float]:
    """Server-wide stats."""
    return dict(stubs.coordinator.GetStats(_pb2.StatsRequest(), timeout=timeout_s).stats)


def health(stubs: Stubs, service: str, timeout_s: float | None) -> str:
    """The grpc.health.v1 status name of ``service`` ("" = the whole server): "SERVING", "NOT_SERVING", ..."""
    response = stubs.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
