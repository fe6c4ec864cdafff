"""``python -m deploy up|status|scale|down`` on a real local Ray bound to 127.0.0.1, as users run it (the CLI
in subprocesses), with ``tiny-random`` in exact mode (experts and attention 16-bit).

The tests run in order on one cluster: a head offering ``expert_host: 2``; ``up --workers 1 --replicas 2``
fills it; a second Ray node offering ``expert_host: 4`` joins; ``scale 2`` (2 shards x 2 replicas) must place
the new generation on that node (the head is full until the switch) and the tokens must not change;
``scale 3 --replicas 1`` has no room for both generations and replaces the workers in place; ``down`` leaves
no actor and no coordinator process.
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

import psutil
import pytest

from client import Client
from conftest import REPO
from coordinator.reference import greedy, reference_model
from deploy.local_ray import LocalRay, free_port

pytestmark = pytest.mark.slow
PROMPT_IDS = [5, 9, 33, 70, 100]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(tiny_ckpt: Path) -> Iterator[LocalRay]:
    head = LocalRay(expert_host=2, num_cpus=2)
    head.start()
    yield head
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


def tokens(address: str) -> list[int]:
    with Client(address, timeout_s=120) as c:
        return c.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS).token_ids


@pytest.fixture(scope="module")
def expected(tiny_ckpt: Path) -> list[int]:
    return greedy(reference_model(tiny_ckpt), PROMPT_IDS, NEW_TOKENS)


@pytest.fixture(scope="module")
def address(cluster: LocalRay, tiny_ckpt: Path) -> str:
    out = deploy(cluster, "up", "--model", str(tiny_ckpt), "--workers", "1", "--replicas", "2", "--port", "0",
                 "--expert-bits", "16", "--attn-bits", "16", "--experts-per-layer", "2")
    match = re.search(r"^coordinator: (127\.0\.0\.1:\d+)$", out.stdout, re.M)
    assert match, out.stdout
    return match.group(1)


def test_up_serves_exact_tokens_and_status_reports_everything(cluster: LocalRay, address: str,
                                                              expected: list[int]) -> None:
    assert tokens(address) == expected
    report = status(cluster)
    coord = report["coordinator"]
    assert coord["address"] == address and coord["health"] == "SERVING" and psutil.pid_exists(coord["pid"])
    assert (coord["workers"], coord["replicas"], coord["generation"]) == (1, 2, 0)
    workers = report["workers"]
    assert sorted((w["shards"], w["replica"]) for w in workers) == [("0/1", 0), ("0/1", 1)]
    for w in workers:
        assert set(w) == {"name", "node", "pid", "address", "shards", "replica", "health", "bytes"}
        assert w["health"] == "SERVING" and w["bytes"] > 0
        assert w["address"].startswith("127.0.0.1:") and psutil.pid_exists(w["pid"])
    assert len({w["node"] for w in workers}) == 1  # both on the head
    table = deploy(cluster, "status").stdout
    assert all(w["name"] in table for w in workers) and "SERVING" in table


def test_second_up_and_oversized_up_fail_fast(cluster: LocalRay, address: str) -> None:
    again = deploy(cluster, "up", "--model", "tiny-random", "--workers", "1", ok=False)
    assert again.returncode == 1 and "already deployed" in again.stderr
    too_big = deploy(cluster, "up", "--model", "tiny-random", "--workers", "5", "--namespace", "other", ok=False)
    assert too_big.returncode == 1 and "expert_host" in too_big.stderr


def test_scale_onto_a_new_node_keeps_tokens(cluster: LocalRay, address: str, expected: list[int]) -> None:
    head_node = {w["node"] for w in status(cluster)["workers"]}
    cluster.add_node(expert_host=4)
    out = deploy(cluster, "scale", "2")
    assert f"coordinator: {address}" in out.stdout  # same address for clients
    report = status(cluster)
    workers = report["workers"]
    assert report["coordinator"]["generation"] == 1 and all("-g1-" in w["name"] for w in workers)
    assert sorted((w["shards"], w["replica"]) for w in workers) == [("0/2", 0), ("0/2", 1), ("1/2", 0), ("1/2", 1)]
    new_nodes = {w["node"] for w in workers}
    assert len(new_nodes) == 1 and new_nodes.isdisjoint(head_node)  # all on the node that joined
    assert all(w["health"] == "SERVING" for w in workers)
    assert tokens(address) == expected


def test_scale_without_room_for_both_generations_replaces_in_place(cluster: LocalRay, address: str,
                                                                    expected: list[int]) -> None:
    out = deploy(cluster, "scale", "3", "--replicas", "1")
    assert "in place" in out.stdout
    report = status(cluster)
    assert sorted(w["shards"] for w in report["workers"]) == ["0/3", "1/3", "2/3"]
    assert report["coordinator"]["generation"] == 2
    assert tokens(address) == expected


def test_a_killed_worker_is_restarted_and_found_again(cluster: LocalRay, address: str,
                                                      expected: list[int]) -> None:
    victim = status(cluster)["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 180
    while True:  # Ray restarts the actor (max_restarts); it reloads from the disk cache on a new port
        row = next(w for w in status(cluster)["workers"] if w["name"] == victim["name"])
        if row["pid"] not in (None, victim["pid"]) and row["health"] == "SERVING":
            break
        assert time.monotonic() < deadline, row
        time.sleep(0.5)  # each status call takes seconds itself
    assert tokens(address) == expected  # the coordinator found it again (Ray discovery of its generation)


def test_down_removes_everything(cluster: LocalRay, address: str) -> None:
    report = status(cluster)
    pids = [report["coordinator"]["pid"], *(w["pid"] for w in report["workers"])]
    out = deploy(cluster, "down")
    assert "removed 4 actors" in out.stdout
    psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    gone = deploy(cluster, "status", ok=False)
    assert gone.returncode == 1 and "nothing deployed" in gone.stderr
    nowhere = deploy(cluster, "status", "--address", f"127.0.0.1:{free_port()}", ok=False)
    assert nowhere.returncode == 1 and "no Ray cluster at" in nowhere.stderr

