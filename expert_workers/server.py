"""``WorkerServer``: the gRPC server of one expert worker (ExpertService + grpc.health.v1), around an ExpertStore.

It binds before the store is loaded: health says NOT_SERVING and expert RPCs answer UNAVAILABLE until
``set_serving(True)``. Used by the plain-process CLI (``python -m expert_workers serve``) and the Ray actor.
The bind follows ``expert_workers.security``: loopback unless told otherwise, a shared token required beyond it
(every call must carry it), optional TLS.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expert_workers import wire
from expert_workers.security import SecurityConfig, load_token, server_interceptors
from expert_workers.service import ErrorMapping, ExpertServicer, FaultInjection, FaultInjectionInterceptor
from expert_workers.store import ExpertStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """How a worker's gRPC server listens."""

    host: str = "127.0.0.1"
    """Interface to bind; loopback unless told otherwise."""
    port: int = 0
    """TCP port; 0 picks a free one (``WorkerServer.address`` says which)."""
    max_workers: int = 16
    """Handler threads: concurrent RPCs served at once (fetches mostly wait on the network)."""
    max_message_bytes: int = wire.MAX_MESSAGE_BYTES
    """gRPC send/receive message size limit."""
    grace_s: float = 5.0
    """On stop, in-flight RPCs get this long to finish."""
    auth_token: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log line
    """Shared secret every call must carry (``authorization: Bearer ...``); required for a non-loopback host."""
    auth_token_file: str | None = None
    """File holding ``auth_token``, read where the server starts (``resolved()``): a Ray actor gets the path,
    never the secret, and re-reads it when Ray restarts it."""
    tls_cert: str | None = None
    """Server certificate chain (PEM file); with ``tls_key`` turns TLS on. Paths, so the config pickles (Ray)."""
    tls_key: str | None = None
    """Server private key (PEM file)."""
    credentials: grpc.ServerCredentials | None = None
    """Prebuilt TLS credentials (``grpc.ssl_server_credentials``), instead of ``tls_cert``/``tls_key``."""
    interceptors: Sequence[grpc.ServerInterceptor] = ()
    """Extra interceptors that run first (outermost)."""

    fault: FaultInjection = field(default_factory=FaultInjection)
    """Test-only fault injection; off by default."""

    @property
    def security(self) -> SecurityConfig:
        """The bind/auth/TLS policy of this config (``validate()`` refuses a non-loopback host without a token)."""
        return SecurityConfig(host=self.host, token=self.auth_token,
                              tls_cert=Path(self.tls_cert) if self.tls_cert else None,
                              tls_key=Path(self.tls_key) if self.tls_key else None)

    def resolved(self) -> ServerConfig:
        """This config with ``auth_token_file`` read into ``auth_token`` (ValueError if it is missing or empty
        here: the file must exist on every node that runs a worker)."""
        if self.auth_token_file is None:
            return self
        try:
            token = load_token(self.auth_token_file)
        except OSError as e:
            raise ValueError(f"cannot read the auth token file {self.auth_token_file} on {socket.gethostname()}: "
                             f"{e.strerror or e}") from None
        return dataclasses.replace(self, auth_token=token, auth_token_file=None)


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class WorkerServer:
    """gRPC server for one ExpertStore: ``start()`` binds at once; ``set_serving(True)`` once loaded."""

    def __init__(self, store: ExpertStore, config: ServerConfig = ServerConfig()) -> None:
        """Raises ValueError for a bind the security policy refuses (before anything is bound) or an unreadable
        ``auth_token_file``."""
        config = config.resolved()
        config.security.validate()
        self.store = store
        self.config = config
        self.health = health.HealthServicer(experimental_non_blocking=True)
        interceptors = [*server_interceptors(config.security), *config.interceptors]
        if config.fault.enabled:
            log.warning("fault injection is ON: %s", config.fault)
            interceptors.append(FaultInjectionInterceptor(config.fault))
        interceptors.append(ErrorMapping(on_error=lambda code: store.count("errors")))
        options = [("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", 0)]  # a second worker must never share our port silently
        self._server = grpc.server(futures.ThreadPoolExecutor(config.max_workers, thread_name_prefix="expert-rpc"),
                                   interceptors=interceptors, options=options)
        wire.pb_grpc.add_ExpertServiceServicer_to_server(ExpertServicer(store), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = 0

    @property
    def address(self) -> str:
        """``HOST:PORT`` clients dial (valid after ``start``)."""
        return f"{_bind_address(self.config.host, self.port)}"

    def start(self) -> str:
        """Binds and starts answering (NOT_SERVING until ``set_serving``); returns the address."""
        self.set_serving(False)
        bind = _bind_address(self.config.host, self.config.port)
        credentials = self.config.credentials
        security = self.config.security
        if credentials is None and security.tls:
            assert security.tls_cert is not None and security.tls_key is not None
            credentials = grpc.ssl_server_credentials([(security.tls_key.read_bytes(),
                                                        security.tls_cert.read_bytes())])
        if credentials is not None:
            self.port = self._server.add_secure_port(bind, credentials)
        else:
            self.port = self._server.add_insecure_port(bind)
        if not self.port:
            raise OSError(f"cannot bind {bind}")
        self._server.start()
        log.info("expert worker listening on %s (loading)", self.address)
        return self.address

    def set_serving(self, serving: bool) -> None:
        """Flips grpc.health.v1 status for the whole server and for moe.v1.ExpertService."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", wire.SERVICE_NAME):
            self.health.set(service, status)

    def stop(self, grace_s: float | None = None) -> None:
        """Stops taking calls, lets in-flight ones finish within the grace period, then returns."""
        self.health.enter_graceful_shutdown()
        self._server.stop(self.config.grace_s if grace_s is None else grace_s).wait()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until the server stops (True) or the timeout passes (False)."""
        return not self._server.wait_for_termination(timeout_s)  # grpc returns "timed out"
