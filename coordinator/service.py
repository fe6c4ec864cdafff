"""The gRPC servicer: translates messages (``coordinator.wire``) and calls the scheduler/engine; nothing else.
Errors propagate as exceptions; ``wire.StatusInterceptor`` turns them into status codes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from coordinator import wire
from coordinator.engine import Coordinator
from coordinator.scheduler import Scheduler


class CoordinatorServicer:
    """moe.v1.CoordinatorService."""

    def __init__(self, engine: Coordinator, scheduler: Scheduler) -> None:
        self.engine = engine
        self.scheduler = scheduler

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802 (gRPC name)
        handle = self.scheduler.submit(wire.params_from_pb(request))
        context.add_callback(lambda: self.scheduler.cancel(handle))  # client gone -> decode stops
        for event in handle:
            yield wire.event_to_pb(event)

    def GetStats(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (gRPC name)
        extra = {"queue_depth": self.scheduler.depth(), "requests_rejected": self.scheduler.rejected,
                 "max_queue": self.scheduler.max_queue,
                 "decode_steps_after_cancel_max": self.scheduler.steps_after_cancel_max}
        return wire.stats_to_pb(self.engine.stats() | extra)
