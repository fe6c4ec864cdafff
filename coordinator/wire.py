"""The gRPC edge: the only module that imports generated code. Converts messages to and from core types and
maps core exceptions to status codes (one interceptor, as TGI does)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import torch

import protos
from coordinator.generate import DEFAULT_MAX_NEW_TOKENS, GenerateParams, InvalidRequest, QueueFull, \
    RequestCancelled, TokenEvent
from coordinator.scheduler import ShuttingDown
from expert_workers.malformed import check_parsed, tolerant
from expert_workers.source import ExpertNotFound, ExpertUnavailable

pb = protos.load("coordinator_pb2")
pb_grpc = protos.load("coordinator_pb2_grpc")
log = logging.getLogger(__name__)
SERVICE_NAME = "moe.v1.CoordinatorService"

# Checked in order: the first matching class decides.
STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # device memory ran out under the cap (coordinator serve --gpu-memory-gb): this request fails, not the server
    (torch.cuda.OutOfMemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ExpertUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (ExpertNotFound, grpc.StatusCode.FAILED_PRECONDITION),
    (RequestCancelled, grpc.StatusCode.CANCELLED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_of(error: BaseException) -> grpc.StatusCode:
    return next((code for cls, code in STATUS if isinstance(error, cls)), grpc.StatusCode.INTERNAL)


def params_from_pb(req: Any) -> GenerateParams:
    """GenerateRequest -> GenerateParams (proto3 ``optional`` fields keep their documented defaults)."""
    return GenerateParams(
        prompt=req.prompt, prompt_token_ids=tuple(req.prompt_token_ids),
        max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS,
        temperature=req.temperature, top_p=req.top_p if req.HasField("top_p") else 1.0,
        seed=req.seed if req.HasField("seed") else None)


def event_to_pb(event: TokenEvent) -> Any:
    msg = pb.GenerateResponse(text=event.text, finish_reason=event.finish_reason,
                              has_token=event.token_id is not None)
    if event.token_id is not None:
        msg.token_id = event.token_id
    msg.stats.update({k: float(v) for k, v in event.stats.items()})
    return msg


def stats_to_pb(stats: Mapping[str, float]) -> Any:
    return pb.StatsResponse(stats={k: float(v) for k, v in stats.items()})


def add_servicer(servicer: object, server: grpc.Server) -> None:
    pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)


class StatusInterceptor(grpc.ServerInterceptor):
    """Turns exceptions raised by servicer methods into gRPC statuses with the exception's message, and
    unparseable request bytes into INVALID_ARGUMENT."""

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream), request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary), request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return handler

    @staticmethod
    def _abort(context: grpc.ServicerContext, error: Exception) -> None:
        code = status_of(error)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error", exc_info=error)
        context.abort(code, str(error) or type(error).__name__)

    def _wrap_stream(self, fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                check_parsed(request, InvalidRequest)
                yield from fn(request, context)
            except Exception as e:  # noqa: BLE001 - every error becomes a status
                self._abort(context, e)

        return wrapped

    def _wrap_unary(self, fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                check_parsed(request, InvalidRequest)
                return fn(request, context)
            except Exception as e:  # noqa: BLE001 - every error becomes a status
                self._abort(context, e)

        return wrapped
