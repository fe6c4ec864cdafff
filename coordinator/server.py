"""Starts the coordinator's gRPC server: CoordinatorService + grpc.health.v1, one status interceptor."""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator import wire
from coordinator.engine import Coordinator
from coordinator.scheduler import Scheduler
from coordinator.service import CoordinatorServicer
from expert_workers.security import SecurityConfig, bind, server_interceptors

MAX_MESSAGE_BYTES = 16 * 2**20  # a prompt of max_position_embeddings tokens fits many times over


@dataclass
class RunningServer:
    """A started server; ``address`` is HOST:PORT actually bound (``port`` 0 picks a free one)."""

    server: grpc.Server
    scheduler: Scheduler
    health: health.HealthServicer
    address: str

    def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING, refuse new requests, stop gRPC after ``grace_s`` and join the engine thread."""
        self.health.enter_graceful_shutdown()
        self.scheduler.close()
        self.server.stop(grace_s).wait()


def serve(engine: Coordinator, host: str = "127.0.0.1", port: int = 0, max_queue: int = 16,
          security: SecurityConfig | None = None, reuse_port: bool = False) -> RunningServer:
    """Binds ``host:port`` (policy of ``expert_workers.security``: loopback unless a token is set) and
    starts serving ``engine`` (already loaded). ``reuse_port`` lets a replacement coordinator bind the
    same port before this one stops (SO_REUSEPORT); off by default so a second server never shares a
    port by accident."""
    security = security or SecurityConfig(host=host)
    security.validate()
    scheduler = Scheduler(engine, max_queue)
    # Every streaming Generate holds a thread: room for the running + queued ones, plus stats/health calls.
    pool = cf.ThreadPoolExecutor(max_workers=max_queue + 8, thread_name_prefix="grpc")
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.so_reuseport", int(reuse_port))]
    interceptors = [*server_interceptors(security), wire.StatusInterceptor()]
    server = grpc.server(pool, interceptors=interceptors, options=options)
    wire.add_servicer(CoordinatorServicer(engine, scheduler), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = bind(server, security, port)
    except BaseException:
        scheduler.close()
        raise
    server.start()
    for name in ("", wire.SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    shown = f"[{security.host}]" if ":" in security.host else security.host
    return RunningServer(server, scheduler, health_servicer, f"{shown}:{bound}")
