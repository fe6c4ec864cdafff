"""``python -m deploy up|status|scale|down`` on a real local Ray bound to 127.0.0.1, as users run it (the CLI
in subprocesses), with ``tiny-random`` in exact mode (experts and attention 16-bit), secured with a shared token
and TLS (``--auth-token-file F --tls-cert C --tls-key K --tls-root R``).

The tests run in order on one cluster: a head offering ``expert_host: 2``; ``up --workers 1 --replicas 2``
fills it; a second Ray node offering ``expert_host: 4`` joins; ``scale 2`` (2 shards x 2 replicas) must place
the new generation on that node (the head is full until the switch) and the tokens must not change;
``scale 3 --replicas 1`` has no room for both generations and replaces the workers in place; ``down`` leaves
no actor and no coordinator process.

Security, on that same deployment (one cluster and one ``deploy up`` serve both stories; each costs a minute of
CI's 2 cores): with a token the worker actors bind their node's Ray IP (127.0.0.1 here; another machine's address
on a real cluster) and require the token, the coordinator sends it to them and requires it from its clients; the
standard health service stays open. Every process reads the file itself: the token is on no command line and in
no Ray log. Deployments without a token run in test_demo (``make demo``) and test_ray_up; settings that cannot
work are refused before the cluster is touched (test_deploy_auth).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import Client, ClientError
from conftest import DEPLOY_TOKEN as TOKEN
from conftest import REPO
from coordinator.reference import greedy, reference_model
from deploy.local_ray import LocalRay, free_port
from expert_workers import wire
from expert_workers.security import TOKEN_ENV, client_channel

pytestmark = pytest.mark.slow
PROMPT_IDS = [5, 9, 33, 70, 100]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def handover() -> dict[str, Any]:
    """What a test passes on to the next one (they run in order on one cluster): ``report``, the ``status
    --json`` report it ended with, for a next test that starts from that very state (a test that changes the
    deployment clears it first; every ``status`` is a Ray driver that imports torch, seconds of CI's 2 cores);
    ``down``, set once test_down_removes_everything has removed the deployment."""
    return {}


@pytest.fixture(scope="module")
def cluster(tiny_ckpt: Path, handover: dict[str, Any]) -> Iterator[LocalRay]:
    head = LocalRay(expert_host=2, num_cpus=2)
    head.env.pop(TOKEN_ENV, None)  # the token must come from the file, not from an inherited environment
    head.start()
    yield head
    if not handover.get("down"):
        subprocess.run([sys.executable, "-m", "deploy", "down"], cwd=REPO, env=head.env, timeout=120,
                       capture_output=True)
    assert head.stop() == [], "Ray processes survived the shutdown"


def deploy(cluster: LocalRay, *args: str, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # A user's shell: RAY_ADDRESS set, but not RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (deploy sets it for loopback).
    env = {k: v for k, v in cluster.env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-m", "deploy", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if ok:
        assert out.returncode == 0, f"deploy {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


def status(cluster: LocalRay) -> dict[str, Any]:
    return json.loads(deploy(cluster, "status", "--json").stdout)


def current_status(cluster: LocalRay, handover: dict[str, Any]) -> dict[str, Any]:
    """The deployment's status now: the previous test's last report if nothing changed since, else asked."""
    return handover.pop("report", None) or status(cluster)


def worker_processes(cluster: LocalRay) -> set[int]:
    """Pids of the cluster's expert worker actor processes (Ray titles each after its actor class)."""
    pids = set()
    for pid in cluster.pids():
        try:
            if " ".join(psutil.Process(pid).cmdline()).startswith("ray::ExpertWorkerActor"):
                pids.add(pid)
        except psutil.Error:  # gone meanwhile
            pass
    return pids


def tokens(address: str, secrets: dict[str, Path]) -> list[int]:
    with Client(address, timeout_s=120, token=TOKEN, tls_root_cert=secrets["cert"]) as c:
        return c.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS).token_ids


@pytest.fixture(scope="module")
def expected(tiny_ckpt: Path) -> list[int]:
    return greedy(reference_model(tiny_ckpt), PROMPT_IDS, NEW_TOKENS)


@pytest.fixture(scope="module")
def address(cluster: LocalRay, tiny_ckpt: Path, secrets: dict[str, Path]) -> str:
    out = deploy(cluster, "up", "--model", str(tiny_ckpt), "--workers", "1", "--replicas", "2", "--port", "0",
                 "--expert-bits", "16", "--attn-bits", "16", "--experts-per-layer", "2",
                 "--auth-token-file", str(secrets["token"]), "--tls-cert", str(secrets["cert"]),
                 "--tls-key", str(secrets["key"]), "--tls-root", str(secrets["cert"]))
    match = re.search(r"^coordinator: (127\.0\.0\.1:\d+)$", out.stdout, re.M)
    assert match, out.stdout
    return match.group(1)


def test_up_serves_exact_tokens_and_status_reports_everything(cluster: LocalRay, address: str,
                                                              expected: list[int], secrets: dict[str, Path],
                                                              handover: dict[str, Any]) -> None:
    assert tokens(address, secrets) == expected
    report = status(cluster)  # health over TLS: no token needed
    coord = report["coordinator"]
    assert coord["address"] == address and coord["health"] == "SERVING" and psutil.pid_exists(coord["pid"])
    assert (coord["workers"], coord["replicas"], coord["generation"]) == (1, 2, 0)
    assert (coord["auth"], coord["tls"]) == (True, True)
    assert (coord["expert_bits"], coord["meta_bits"]) == (16, 16)
    workers = report["workers"]
    assert sorted((w["shards"], w["replica"]) for w in workers) == [("0/1", 0), ("0/1", 1)]
    for w in workers:
        assert set(w) == {"name", "node", "pid", "address", "shards", "replica", "health", "bytes"}
        assert w["health"] == "SERVING" and w["bytes"] > 0
        # with a token: the node's Ray IP, which is loopback here
        assert w["address"].startswith("127.0.0.1:") and psutil.pid_exists(w["pid"])
    assert {w["node"] for w in workers} == {coord["node"]}  # both on the head, where `deploy up` placed it
    table = deploy(cluster, "status").stdout
    assert all(w["name"] in table for w in workers) and "SERVING" in table
    handover["report"] = report


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


def test_token_and_tls_guard_every_hop(cluster: LocalRay, address: str, secrets: dict[str, Path],
                                       handover: dict[str, Any],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cert = secrets["cert"]
    with Client(address, timeout_s=30, tls_root_cert=cert) as c, pytest.raises(ClientError) as err:
        c.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=1)
    assert err.value.code == "UNAUTHENTICATED"
    with Client(address, timeout_s=30, token="wrong", tls_root_cert=cert) as c, pytest.raises(ClientError) as err:
        c.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=1)
    assert err.value.code == "PERMISSION_DENIED"

    report = current_status(cluster, handover)
    coord, workers = report["coordinator"], report["workers"]
    assert (coord["health"], coord["auth"], coord["tls"]) == ("SERVING", True, True)
    for worker in workers:
        assert worker["health"] == "SERVING"
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
    handover["report"] = report  # unchanged


def test_second_up_and_oversized_up_fail_fast(cluster: LocalRay, address: str) -> None:
    again = deploy(cluster, "up", "--model", "tiny-random", "--workers", "1", ok=False)
    assert again.returncode == 1 and "already deployed" in again.stderr
    too_big = deploy(cluster, "up", "--model", "tiny-random", "--workers", "5", "--namespace", "other", ok=False)
    assert too_big.returncode == 1 and "expert_host" in too_big.stderr


def test_scale_onto_a_new_node_keeps_tokens(cluster: LocalRay, address: str, expected: list[int],
                                            secrets: dict[str, Path], handover: dict[str, Any]) -> None:
    handover.clear()
    cluster.add_node(expert_host=4)
    out = deploy(cluster, "scale", "2")
    assert f"coordinator: {address}" in out.stdout  # same address for clients
    report = status(cluster)
    coord, workers = report["coordinator"], report["workers"]
    assert coord["generation"] == 1 and all("-g1-" in w["name"] for w in workers)
    assert sorted((w["shards"], w["replica"]) for w in workers) == [("0/2", 0), ("0/2", 1), ("1/2", 0), ("1/2", 1)]
    new_nodes = {w["node"] for w in workers}
    # all on the node that joined: not on the head, which held generation 0 (and holds the coordinator)
    assert len(new_nodes) == 1 and coord["node"] not in new_nodes
    assert all(w["health"] == "SERVING" for w in workers)
    assert tokens(address, secrets) == expected
    handover["report"] = report


def test_scale_without_room_for_both_generations_replaces_in_place(cluster: LocalRay, address: str,
                                                                    expected: list[int], secrets: dict[str, Path],
                                                                    handover: dict[str, Any]) -> None:
    handover.clear()
    out = deploy(cluster, "scale", "3", "--replicas", "1")
    assert "in place" in out.stdout
    report = status(cluster)
    assert sorted(w["shards"] for w in report["workers"]) == ["0/3", "1/3", "2/3"]
    assert report["coordinator"]["generation"] == 2
    assert tokens(address, secrets) == expected
    handover["report"] = report


def test_a_killed_worker_is_restarted_and_found_again(cluster: LocalRay, address: str, expected: list[int],
                                                      secrets: dict[str, Path],
                                                      handover: dict[str, Any]) -> None:
    victim = current_status(cluster, handover)["workers"][0]
    before = worker_processes(cluster)
    assert victim["pid"] in before
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 180
    while not worker_processes(cluster) - before:  # cheap to watch; a status call meanwhile would only find it dead
        assert time.monotonic() < deadline, "Ray started no new expert worker process"
        time.sleep(0.2)
    while True:  # Ray restarts the actor (max_restarts); it reloads from the disk cache on a new port
        report = status(cluster)
        row = next(w for w in report["workers"] if w["name"] == victim["name"])
        if row["pid"] not in (None, victim["pid"]) and row["health"] == "SERVING":
            break
        assert time.monotonic() < deadline, row
        time.sleep(0.5)  # each status call takes seconds itself
    assert tokens(address, secrets) == expected  # the coordinator found it again (Ray discovery of its generation)
    if all(w["health"] == "SERVING" for w in report["workers"]):
        handover["report"] = report


def test_down_removes_everything(cluster: LocalRay, address: str, handover: dict[str, Any]) -> None:
    report = current_status(cluster, handover)
    pids = [report["coordinator"]["pid"], *(w["pid"] for w in report["workers"])]
    out = deploy(cluster, "down")
    assert "removed 4 actors" in out.stdout
    psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    gone = deploy(cluster, "status", ok=False)
    assert gone.returncode == 1 and "nothing deployed" in gone.stderr
    handover["down"] = True
    nowhere = deploy(cluster, "status", "--address", f"127.0.0.1:{free_port()}", ok=False)
    assert nowhere.returncode == 1 and "no Ray cluster at" in nowhere.stderr


def test_free_ports_stay_clear_of_ports_ray_and_the_kernel_hand_out() -> None:
    """Ports picked for Ray's head, the coordinator and sshd lie between Ray's worker ports and the kernel's
    ephemeral range, so Ray's own servers (bound as port 0 while the cluster starts) cannot take one first;
    each is free to bind when returned."""
    import socket

    from deploy.local_ray import RAY_WORKER_PORTS_END, ephemeral_ports

    lo, _ = ephemeral_ports()
    for port in {free_port() for _ in range(20)}:
        assert RAY_WORKER_PORTS_END < port < lo
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
