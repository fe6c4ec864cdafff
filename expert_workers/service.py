"""The gRPC face of an ExpertStore: a servicer that only translates, and the server interceptors.

- ``ExpertServicer``: request message -> store call -> response message (via ``wire``). No logic of its own.
- ``ErrorMapping``: the one place exceptions become status codes; the server keeps serving after any of them.
- ``FaultInjectionInterceptor``: test-only faults (delay, corrupted payload), off unless ``FaultInjection`` says so.

Further cross-cutting concerns (an auth-token check, say) are more interceptors, passed to ``WorkerServer``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from expert_workers import wire
from expert_workers.malformed import check_parsed, tolerant
from expert_workers.source import ExpertNotFound, ExpertUnavailable
from expert_workers.store import ExpertStore, WorkerNotReady

log = logging.getLogger(__name__)


class ExpertServicer(wire.pb_grpc.ExpertServiceServicer):  # type: ignore[misc,name-defined]
    """moe.v1.ExpertService over one ExpertStore."""

    def __init__(self, store: ExpertStore) -> None:
        self.store = store

    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return wire.info_to_pb(self.store.info())

    def FetchExpert(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        key = wire.key_from_pb(request)
        size = wire.chunk_size(request.chunk_bytes)
        manifest = self.store.manifest(key)  # fails before the stream starts, so the status is clean
        for offset, piece in self.store.chunks(key, size):
            yield wire.chunk_to_pb(offset, piece, manifest if offset == 0 else None)

    def GetExpertHandle(self, request: Any, context: grpc.ServicerContext) -> Any:
        return wire.handle_to_pb(self.store.handle(wire.key_from_pb(request)))

    def GetStats(self, request: Any, context: grpc.ServicerContext) -> Any:
        return wire.stats_to_pb(self.store.stats())


class DataLossError(RuntimeError):
    """Bytes failed their checksum (gRPC: DATA_LOSS)."""


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for an exception raised while serving."""
    msg = str(exc.args[0]) if exc.args else type(exc).__name__
    if isinstance(exc, (WorkerNotReady, ExpertUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, msg
    if isinstance(exc, (ExpertNotFound, KeyError)):
        return grpc.StatusCode.NOT_FOUND, msg
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, msg
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, msg
    if isinstance(exc, DataLossError):
        return grpc.StatusCode.DATA_LOSS, msg
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _wrap_handler(handler: grpc.RpcMethodHandler, wrap_unary: Callable[[Any], Any],
                  wrap_stream: Callable[[Any], Any]) -> grpc.RpcMethodHandler:
    """The same handler with its unary-response or stream-response behaviour wrapped."""
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=wrap_unary(handler.unary_unary))  # type: ignore[attr-defined]
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=wrap_stream(handler.unary_stream))  # type: ignore[attr-defined]
    return handler  # no client-streaming RPCs in this service


class ErrorMapping(grpc.ServerInterceptor):
    """Turns any exception from a handler into ``context.abort(code, message)`` (see ``status_of``), and an
    unparseable request into INVALID_ARGUMENT."""

    def __init__(self, on_error: Callable[[grpc.StatusCode], None] | None = None) -> None:
        self._on_error = on_error

    def _abort(self, context: grpc.ServicerContext, exc: Exception, method: str) -> None:
        if context.code() not in (None, grpc.StatusCode.OK):  # the handler aborted itself: keep its status
            raise exc
        code, msg = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method)
        if self._on_error is not None:
            self._on_error(code)
        context.abort(code, msg)

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method

        def wrap_unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    check_parsed(request)
                    return fn(request, context)
                except Exception as e:  # noqa: BLE001 - every error becomes a status; the server lives on
                    self._abort(context, e, method)
            return call

        def wrap_stream(fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    check_parsed(request)
                    yield from fn(request, context)
                except Exception as e:  # noqa: BLE001
                    self._abort(context, e, method)
            return call

        handler = handler._replace(request_deserializer=tolerant(handler.request_deserializer))
        return _wrap_handler(handler, wrap_unary, wrap_stream)


@dataclass(frozen=True)
class FaultInjection:
    """Faults a worker injects into its own answers, for failover tests. Off by default; never in production."""

    delay_ms: int = 0
    """Wait this long before answering each call of ``methods`` (less if the caller gives up first)."""
    corrupt_every: int = 0
    """Flip one byte of the payload of every N-th FetchExpert stream (0 = never): the client must catch it."""
    truncate_every: int = 0
    """End every N-th FetchExpert stream early, after half of its first chunk (0 = never)."""
    methods: tuple[str, ...] = ("FetchExpert", "GetExpertHandle")
    """Short names of the RPCs the delay applies to."""
    hold_load_while: str = ""
    """Loading waits while this file exists: a test sees the worker bound but not ready, for as long as it likes."""

    @property
    def enabled(self) -> bool:
        return self.delay_ms > 0 or self.corrupt_every > 0 or self.truncate_every > 0 or bool(self.hold_load_while)

    def wait_before_load(self, stop: threading.Event) -> None:
        """Blocks while ``hold_load_while`` exists (or until ``stop`` is set)."""
        while self.hold_load_while and os.path.exists(self.hold_load_while) and not stop.wait(0.05):
            pass


def _delay(context: grpc.ServicerContext, seconds: float) -> None:
    """Sleeps up to ``seconds``, less when the call ends first (deadline, cancel): an injected delay must not pile
    up handler threads behind callers that have long gone."""
    if seconds <= 0:
        return
    ended = threading.Event()
    if context.add_callback(ended.set):  # False: the call has ended already
        ended.wait(seconds)


class FaultInjectionInterceptor(grpc.ServerInterceptor):
    """Applies a FaultInjection to the service's responses."""

    def __init__(self, fault: FaultInjection) -> None:
        self.fault = fault
        self._fetches = 0
        self._lock = threading.Lock()

    def _faults_for_next_fetch(self) -> tuple[bool, bool]:
        """(corrupt, truncate) for the next FetchExpert stream."""
        with self._lock:
            self._fetches += 1
            n = self._fetches
        f = self.fault
        return (bool(f.corrupt_every) and n % f.corrupt_every == 0,
                bool(f.truncate_every) and n % f.truncate_every == 0)

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        name = details.method.rsplit("/", 1)[-1]
        if handler is None:
            return None
        delay = self.fault.delay_ms / 1000 if name in self.fault.methods else 0.0
        is_fetch = name == "FetchExpert"

        def wrap_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                _delay(context, delay)
                return fn(request, context)
            return call

        def wrap_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                _delay(context, delay)
                flip, cut = self._faults_for_next_fetch() if is_fetch else (False, False)
                for i, msg in enumerate(fn(request, context)):
                    if (flip or cut) and i == 0 and msg.data:
                        data = bytearray(msg.data)
                        if flip:
                            data[len(data) // 2] ^= 0xFF
                        msg.data = bytes(data[:len(data) // 2] if cut else data)
                    yield msg
                    if cut:
                        return  # the stream ends "cleanly", short of the manifest's size
            return call

        return _wrap_handler(handler, wrap_unary, wrap_stream)
