"""Auth token interceptor, loopback bind policy and TLS on a real gRPC server on 127.0.0.1."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expert_workers.security import SecurityConfig, bind, client_channel, is_loopback, server_interceptors

ECHO = "/test.Echo/Say"


def _echo_handler() -> grpc.GenericRpcHandler:
    say = grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"echo:" + req,
                                              request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler("test.Echo", {"Say": say})


def _serve(config: SecurityConfig) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=server_interceptors(config))
    server.add_generic_rpc_handlers((_echo_handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = bind(server, config, 0)
    server.start()
    return server, port


def _say(channel: grpc.Channel) -> bytes:
    return channel.unary_unary(ECHO)(b"hi", timeout=10)


@pytest.fixture
def token_server() -> Iterator[int]:
    server, port = _serve(SecurityConfig(token="s3cret"))
    yield port
    server.stop(0)


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.3.2.1") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.org")


def test_non_loopback_bind_needs_token() -> None:
    with pytest.raises(ValueError, match="needs a shared token"):
        SecurityConfig(host="0.0.0.0").validate()
    SecurityConfig(host="0.0.0.0", token="t").validate()  # allowed with a token
    SecurityConfig().validate()  # loopback without a token is the default


def test_token_required(token_server: int) -> None:
    addr = f"127.0.0.1:{token_server}"
    with grpc.insecure_channel(addr) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _say(ch)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health stays open for probes
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with client_channel(addr, token="wrong") as ch:
        with pytest.raises(grpc.RpcError) as err:
            _say(ch)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with client_channel(addr, token="s3cret") as ch:
        assert _say(ch) == b"echo:hi"
    # the server kept serving after the rejected calls
    with client_channel(addr, token="s3cret") as ch:
        assert _say(ch) == b"echo:hi"


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return key, cert


def test_tls_with_token(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    server, port = _serve(SecurityConfig(token="tok", tls_cert=cert, tls_key=key))
    try:
        with client_channel(f"127.0.0.1:{port}", token="tok", root_cert=cert) as ch:
            assert _say(ch) == b"echo:hi"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # plaintext to a TLS port fails
            with pytest.raises(grpc.RpcError) as err:
                _say(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)
