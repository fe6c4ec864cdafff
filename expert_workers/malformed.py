"""Unparseable request bytes become INVALID_ARGUMENT, on both gRPC services (expert workers and coordinator).

gRPC itself answers INTERNAL when a request deserializer raises, which blames the server for the caller's bytes.
Each service's error-mapping interceptor instead wraps the handler's deserializer with ``tolerant`` (a parse
failure yields a ``Malformed`` stand-in rather than raising) and calls ``check_parsed`` first thing in the
handler, which raises the service's own invalid-argument error. Lives here, in the package the coordinator
already imports, so the two interceptors share one implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request that did not parse, so the handler can answer INVALID_ARGUMENT."""

    error: str
    """``ExceptionType: message`` of the parse failure."""


def tolerant(deserializer: Deserializer | None) -> Deserializer | None:
    """``deserializer`` that returns ``Malformed`` instead of raising (None stays None: raw bytes)."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the caller's malformed bytes
            return Malformed(f"{type(e).__name__}: {e}")

    return parse


def check_parsed(request: Any, error: type[Exception] = ValueError) -> None:
    """Raises ``error("malformed request: ...")`` when ``request`` is a ``Malformed`` stand-in."""
    if isinstance(request, Malformed):
        raise error(f"malformed request: {request.error}")
