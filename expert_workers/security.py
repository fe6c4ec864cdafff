"""Who may talk to our gRPC servers: loopback by default, a shared token beyond it, optional TLS.

Policy (both services, expert workers and coordinator):
- A server binds 127.0.0.1 unless told otherwise.
- Binding any non-loopback address requires a shared token; without one the server refuses to start.
- With a token, every RPC must carry ``authorization: Bearer <token>``: none → UNAUTHENTICATED, a wrong one →
  PERMISSION_DENIED. The standard health service stays open so load balancers and probes can use it; it
  reveals nothing but SERVING/NOT_SERVING.
- TLS (server certificate + key, PEM) is optional and independent of the token.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

AUTH_HEADER = "authorization"
TOKEN_ENV = "MOE_AUTH_TOKEN"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: assume it resolves to a real interface


@dataclass(frozen=True)
class SecurityConfig:
    """How a server authenticates callers and encrypts traffic."""

    host: str = "127.0.0.1"
    """Address to bind."""
    token: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log line
    """Shared secret callers must present; required when ``host`` is not loopback."""
    tls_cert: Path | None = None
    """Server certificate chain (PEM); with ``tls_key`` turns TLS on."""
    tls_key: Path | None = None
    """Server private key (PEM)."""

    def validate(self) -> None:
        """Raises ValueError for a configuration that must not start."""
        if not is_loopback(self.host) and not self.token:
            raise ValueError(f"refusing to bind {self.host}: a non-loopback address needs a shared token "
                             f"(--auth-token-file FILE or ${TOKEN_ENV})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def load_token(token_file: str | os.PathLike[str] | None) -> str | None:
    """The token from a file (first line, stripped), else from $MOE_AUTH_TOKEN, else None."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"auth token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _deny(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the shared token before they reach a servicer."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        if handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        presented = metadata.get(AUTH_HEADER)
        if presented is None:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "missing authorization token")
        # constant-time comparison: the token is a secret
        if not hmac.compare_digest(str(presented).encode(), self._expected):
            return _deny(grpc.StatusCode.PERMISSION_DENIED, "invalid authorization token")
        return continuation(handler_call_details)


def server_interceptors(config: SecurityConfig) -> list[grpc.ServerInterceptor]:
    """Interceptors a server needs for ``config`` (put them first)."""
    return [TokenAuthInterceptor(config.token)] if config.token else []


def bind(server: grpc.Server, config: SecurityConfig, port: int) -> int:
    """Validates the policy, binds ``host:port`` (TLS if configured) and returns the bound port."""
    config.validate()
    address = f"[{config.host}]:{port}" if ":" in config.host else f"{config.host}:{port}"
    if config.tls:
        assert config.tls_cert is not None and config.tls_key is not None
        creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    return bound


class _TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token to every call on an insecure channel (call credentials need TLS)."""

    def __init__(self, token: str) -> None:
        self._header = (AUTH_HEADER, f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or ()) + [self._header]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def client_channel(address: str, token: str | None = None, root_cert: Path | None = None,
                   options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to one of our servers: TLS when ``root_cert`` is given, the token on every call."""
    if root_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=root_cert.read_bytes())
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(address, creds, options=list(options))
    channel = grpc.insecure_channel(address, options=list(options))
    return grpc.intercept_channel(channel, _TokenClientInterceptor(token)) if token else channel
