"""``python -m deploy up --auth-token-file F --tls-cert C --tls-key K --tls-root R`` on a real local Ray bound to
127.0.0.1 (the CLI in subprocesses, as users run it), ``tiny-random`` in exact mode.

With a token the worker actors bind their node's Ray IP (127.0.0.1 here; another machine's address on a real
cluster) and require the token, the coordinator sends it to them and requires it from its clients; the
standard health service stays open. Every process reads the file itself: the token is on no command line and
in no Ray log. Settings that cannot work are refused before the cluster is touched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from conftest import REPO
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_security import _self_signed

from client import Client, ClientError
from coordinator.reference import greedy, reference_model
from deploy.local_ray import LocalRay
from deploy.spec import DeploySpec
from expert_workers import wire
from expert_workers.security import TOKEN_ENV, client_channel
from expert_workers.server import ServerConfig

TOKEN = "deploy-auth-s3cret-7f9c"
PROMPT_IDS = [5, 9, 33, 70, 100]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("deploy-secrets")
    token = d / "token"
    token.write_text(TOKEN + "\n")
    key, cert = _self_signed(d)  # SAN 127.0.0.1: every server of this cluster binds it
    return {"token": token, "key": key, "cert": cert}


def deploy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def cluster(tiny_ckpt: Path) -> Iterator[LocalRay]:
    head = LocalRay(expert_host=1, num_cpus=2)
    head.env.pop(TOKEN_ENV, None)  # the token must come from the file, not from an inherited environment
    head.start()
    yield head
    deploy(head.env, "down")
    assert head.stop() == [], "Ray processes survived the shutdown"


@pytest.fixture(scope="module")
def address(cluster: LocalRay, tiny_ckpt: Path, secrets: dict[str, Path]) -> str:
    out = deploy(cluster.env, "up", "--model", str(tiny_ckpt), "--workers", "1", "--port", "0", "--expert-bits",
                 "16", "--attn-bits", "16", "--experts-per-layer", "2", "--auth-token-file", str(secrets["token"]),
                 "--tls-cert", str(secrets["cert"]), "--tls-key", str(secrets["key"]),
                 "--tls-root", str(secrets["cert"]))
    assert out.returncode == 0, f"deploy up:\n{out.stdout}\n{out.stderr}"
    match = re.search(r"^coordinator: (127\.0\.0\.1:\d+)$", out.stdout, re.M)
    assert match, out.stdout
    return match.group(1)


def _worker_call(address: str, cert: Path, token: str | None) -> tuple[grpc.StatusCode, str]:
    """(status of GetInfo, health) on one worker, over TLS, with ``token`` or none."""
    with client_channel(address, token=token, root_cert=cert) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        try:
            wire.pb_grpc.ExpertServiceStub(channel).GetInfo(wire.info_request(), timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
    return code, health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)


@pytest.mark.slow
def test_deploy_with_token_and_tls(cluster: LocalRay, address: str, secrets: dict[str, Path],
                                   tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cert = secrets["cert"]
    with Client(address, timeout_s=120, token=TOKEN, tls_root_cert=cert) as c:
        got = c.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS).token_ids
    assert got == greedy(reference_model(tiny_ckpt), PROMPT_IDS, NEW_TOKENS)
    with Client(address, timeout_s=30, tls_root_cert=cert) as c, pytest.raises(ClientError) as err:
        c.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=1)
    assert err.value.code == "UNAUTHENTICATED"

    status = deploy(cluster.env, "status", "--json")  # health over TLS, no token needed
    assert status.returncode == 0, status.stderr
    report: dict[str, Any] = json.loads(status.stdout)
    coord, [worker] = report["coordinator"], report["workers"]
    assert (coord["health"], coord["auth"], coord["tls"], worker["health"]) == ("SERVING", True, True, "SERVING")
    assert worker["address"].startswith("127.0.0.1:")  # the node's Ray IP, which is loopback here

    assert _worker_call(worker["address"], cert, None) == (grpc.StatusCode.UNAUTHENTICATED, "SERVING")
    assert _worker_call(worker["address"], cert, "wrong")[0] == grpc.StatusCode.PERMISSION_DENIED
    assert _worker_call(worker["address"], cert, TOKEN) == (grpc.StatusCode.OK, "SERVING")

    # The secret travelled as a file path only: no command line and no Ray log holds it.
    coordinator_cmdline = " ".join(psutil.Process(coord["pid"]).cmdline())
    assert f"--auth-token-file {secrets['token']}" in coordinator_cmdline and TOKEN not in coordinator_cmdline
    cmdlines = [" ".join(psutil.Process(pid).cmdline()) for pid in cluster.pids() if psutil.pid_exists(pid)]
    assert len(cmdlines) > 3 and not [line for line in cmdlines if TOKEN in line]
    logs = [p for p in cluster.temp_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert logs and not [p for p in logs if TOKEN.encode() in p.read_bytes()]


def test_bad_security_settings_are_refused_before_the_cluster(tmp_path: Path, secrets: dict[str, Path]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    base = ["up", "--model", "tiny-random", "--workers", "1", "--address", "127.0.0.1:1"]  # nothing listens there
    cases = [(["--auth-token-file", str(tmp_path / "missing")], "cannot read"),
             (["--auth-token-file", str(empty)], "is empty"),
             (["--tls-cert", str(secrets["cert"]), "--tls-key", str(secrets["key"])], "--tls-root")]
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "RAY_ADDRESS")}
    for extra, message in cases:
        out = deploy(env, *base, *extra)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr)


def test_the_token_travels_as_a_path(tmp_path: Path, secrets: dict[str, Path]) -> None:
    spec = DeploySpec(model="tiny-random", auth_token_file=str(secrets["token"]), tls_cert=str(secrets["cert"]),
                      tls_key=str(secrets["key"]), tls_root=str(secrets["cert"]))
    args = spec.coordinator_args("127.0.0.1:6379", 0, 0, "cpu")
    assert TOKEN not in " ".join(args) and "--auth-token-file" in args and "--worker-tls-root" in args
    with pytest.raises(ValueError, match="absolute path"):
        DeploySpec(model="tiny-random", auth_token_file="token")
    config = ServerConfig(auth_token_file=str(secrets["token"])).resolved()
    assert config.auth_token == TOKEN and TOKEN not in repr(config) and TOKEN not in repr(config.security)
    with pytest.raises(ValueError, match="cannot read the auth token file"):
        ServerConfig(auth_token_file=str(tmp_path / "missing")).resolved()


def test_coordinator_args_carry_the_decode_settings() -> None:
    """``deploy up --prefetch N --prefetch-ahead A --decode MODE --no-speculate --no-pipeline`` reach the
    coordinator's command line; bad values are refused before anything starts."""
    spec = DeploySpec(model="tiny-random", prefetch=3, prefetch_ahead=2, decode="static")
    args = spec.coordinator_args("127.0.0.1:6379", 0, 0, "cpu")
    assert args[args.index("--prefetch") + 1] == "3" and args[args.index("--prefetch-ahead") + 1] == "2"
    assert args[args.index("--decode") + 1] == "static" and "--no-speculate" not in args
    assert "--no-pipeline" not in args
    from deploy.__main__ import _parser, _spec

    quiet = _spec(_parser().parse_args(["up", "--model", "tiny-random", "--workers", "1", "--no-speculate",
                                        "--no-pipeline"]))
    quiet_args = quiet.coordinator_args("127.0.0.1:6379", 0, 0, "cpu")
    assert not quiet.speculate and "--no-speculate" in quiet_args
    assert not quiet.pipeline and "--no-pipeline" in quiet_args
    from coordinator.__main__ import parse_args

    assert parse_args(quiet_args).no_pipeline  # and the coordinator takes it
    from coordinator.config import DECODE_MODES
    from deploy.spec import DECODE_MODES as DEPLOY_DECODE_MODES

    assert DEPLOY_DECODE_MODES == DECODE_MODES  # deploy keeps its own copy to stay free of torch
    for bad in ({"prefetch": -1}, {"prefetch_ahead": 3}, {"decode": "fast"}):
        with pytest.raises(ValueError, match="prefetch|decode"):
            DeploySpec(model="tiny-random", **bad)  # type: ignore[arg-type]
