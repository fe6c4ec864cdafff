"""Security end to end (issue 5), with the real CLIs on 127.0.0.1: both servers bind loopback by default; a
non-loopback bind without a shared token is refused before anything is bound; with a token every call must carry
it (UNAUTHENTICATED without, PERMISSION_DENIED when wrong); the coordinator passes its token (and TLS root) to the
workers; the client sends it; TLS on both hops.

No test binds a non-loopback address: the refusal is tested by asking for 0.0.0.0 without a token.
"""

from __future__ import annotations

import concurrent.futures as cf
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import REPO, ServerProcess, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_security import _self_signed

from client import Client, ClientError
from expert_workers import wire
from expert_workers.security import TOKEN_ENV, client_channel

pytestmark = pytest.mark.timeout(240)
TOKEN = "e2e-s3cret-token"
NO_TOKEN_ENV = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}


def _address(hex_addr: str) -> str:
    """An address of /proc/net/tcp{,6} (little-endian 32-bit words) as text; v4-mapped IPv6 as IPv4."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return str(ipaddress.IPv4Address(words))
    ip = ipaddress.IPv6Address(words)
    return str(ip.ipv4_mapped or ip)


def listening_hosts(port: int) -> set[str]:
    """Local addresses with a socket LISTENing on ``port`` (from /proc/net/tcp and tcp6)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                hosts.add(_address(addr))
    return hosts


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env if env is not None else NO_TOKEN_ENV)


def test_non_loopback_bind_without_a_token_is_refused_before_binding(tiny_ckpt: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    worker = ["expert_workers", "serve", "--model", str(tiny_ckpt), "--shard", "0/1", "--port", "0"]
    # --workers points nowhere: a coordinator that got past the policy check would wait for it for minutes
    coordinator = ["coordinator", "serve", "--model", str(tiny_ckpt), "--workers", "127.0.0.1:1", "--port", "0"]
    cases = [(worker + ["--host", "0.0.0.0"], "refusing to bind 0.0.0.0"),
             (worker + ["--host", "::", "--auth-token-file", str(empty)], "is empty"),  # empty is not "no token"
             (coordinator + ["--host", "0.0.0.0"], "refusing to bind 0.0.0.0")]
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run_cli, [args for args, _ in cases]))
    for (args, message), r in zip(cases, results):
        out = r.stdout + r.stderr
        assert r.returncode != 0 and message in out, (args, r.returncode, out[-2000:])
        assert "listening on" not in out and "serving on" not in out  # it never bound anything
    assert "needs a shared token (--auth-token-file FILE or $MOE_AUTH_TOKEN)" in results[0].stderr


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("secrets")
    token = d / "token"
    token.write_text(TOKEN + "\n")
    key, cert = _self_signed(d)
    return {"token": token, "key": key, "cert": cert}


@pytest.fixture(scope="module")
def tls_system(tiny_ckpt: Path, secrets_dir: dict[str, Path]) -> Iterator[dict[str, ServerProcess]]:
    """Worker and coordinator, both TLS and token-protected, on their default (loopback) bind."""
    tls = ["--tls-cert", str(secrets_dir["cert"]), "--tls-key", str(secrets_dir["key"]),
           "--auth-token-file", str(secrets_dir["token"])]
    worker = start_server(["expert_workers", "serve", "--model", str(tiny_ckpt), "--shard", "0/1", "--port", "0",
                           "--expert-bits", "16", "--no-progress", *tls], env=NO_TOKEN_ENV)
    try:
        coordinator = start_server(["coordinator", "serve", "--model", str(tiny_ckpt), "--workers", worker.address,
                                    "--port", "0", "--device", "cpu", "--attn-bits", "16", "--wait-workers-s", "60",
                                    "--worker-tls-root", str(secrets_dir["cert"]), *tls],
                                   env={**NO_TOKEN_ENV, "OMP_NUM_THREADS": "1"})
        yield {"worker": worker, "coordinator": coordinator}
        assert coordinator.stop() == 0
    finally:
        assert worker.stop() == 0


def test_tls_and_token_end_to_end(tls_system: dict[str, ServerProcess], secrets_dir: dict[str, Path],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    worker, coordinator = tls_system["worker"], tls_system["coordinator"]
    for server in (worker, coordinator):  # default bind: loopback only
        assert server.address.startswith("127.0.0.1:") and listening_hosts(server.port) == {"127.0.0.1"}
    cert = secrets_dir["cert"]

    # The worker: every expert RPC needs the token; health stays open for probes.
    def worker_info(token: str | None) -> grpc.StatusCode:
        with client_channel(worker.address, token=token, root_cert=cert) as channel:
            try:
                wire.pb_grpc.ExpertServiceStub(channel).GetInfo(wire.info_request(), timeout=10)
            except grpc.RpcError as e:
                return e.code()
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            return grpc.StatusCode.OK

    assert worker_info(None) == grpc.StatusCode.UNAUTHENTICATED
    assert worker_info("wrong") == grpc.StatusCode.PERMISSION_DENIED
    assert worker_info(TOKEN) == grpc.StatusCode.OK  # and the coordinator got this far: it sent the token
    with grpc.insecure_channel(worker.address) as plain, pytest.raises(grpc.RpcError) as info:
        wire.pb_grpc.ExpertServiceStub(plain).GetInfo(wire.info_request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no plaintext on a TLS port

    # The coordinator, through the public client.
    for token, code in ((None, "UNAUTHENTICATED"), ("wrong", "PERMISSION_DENIED")):
        with Client(coordinator.address, token=token, tls_root_cert=cert) as c, pytest.raises(ClientError) as err:
            c.generate(prompt_token_ids=[1, 2, 3], max_new_tokens=4)
        assert err.value.code == code
        with Client(coordinator.address, token=token, tls_root_cert=cert) as c:
            assert c.health() == "SERVING"  # probes need no token
    with Client(coordinator.address, token=TOKEN, tls_root_cert=cert) as c:
        r = c.generate(prompt_token_ids=[1, 2, 3], max_new_tokens=4)
        assert len(r.token_ids) == 4 and c.stats()["generated_tokens"] >= 4
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with Client(coordinator.address, tls_root_cert=cert) as c:  # the client's default: $MOE_AUTH_TOKEN
        assert c.generate(prompt_token_ids=[1, 2, 3], max_new_tokens=4).token_ids == r.token_ids
    with Client(coordinator.address, token=TOKEN) as c, pytest.raises(ClientError) as err:
        c.generate(prompt_token_ids=[1, 2, 3], max_new_tokens=4)  # plaintext to a TLS server
    assert err.value.code == "UNAVAILABLE"


def test_coordinator_without_the_token_cannot_use_the_workers(tiny_ckpt: Path) -> None:
    """A plaintext worker taking its token from $MOE_AUTH_TOKEN turns away a coordinator that has none."""
    worker = start_server(["expert_workers", "serve", "--model", str(tiny_ckpt), "--shard", "0/1", "--port", "0",
                           "--expert-bits", "16", "--no-progress"], env={**NO_TOKEN_ENV, TOKEN_ENV: TOKEN})
    try:
        assert listening_hosts(worker.port) == {"127.0.0.1"}
        refused = run_cli(["coordinator", "serve", "--model", str(tiny_ckpt), "--workers", worker.address, "--port",
                           "0", "--device", "cpu", "--attn-bits", "16", "--wait-workers-s", "30"])
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr, refused.stderr[-2000:]
        with client_channel(worker.address, token=TOKEN) as channel:  # plaintext + token works
            info = wire.pb_grpc.ExpertServiceStub(channel).GetInfo(wire.info_request(), timeout=10)
            assert info.ready
    finally:
        assert worker.stop() == 0
