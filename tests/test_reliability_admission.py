"""Admission control and client disconnects (issue 5) against a real ``python -m coordinator serve`` process and a
real expert worker process on 127.0.0.1.

Capacity: ``--max-queue N`` bounds the requests *waiting* for the engine; the one request being decoded is not
counted (it holds the engine, not a queue slot), so at most N + 1 requests are admitted at once and the (N+1)-th
waiting one gets RESOURCE_EXHAUSTED at once. The worker answers every fetch 15 ms late and the coordinator keeps
one expert per layer, so a long first request holds the engine while a burst arrives: that makes the outcome
exact instead of a race.
"""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, ServerProcess, start_server

from client import Client, ClientError
from coordinator.reference import greedy, reference_model

pytestmark = pytest.mark.timeout(240)
MAX_QUEUE = 3


@pytest.fixture(scope="module")
def coordinator(tiny_ckpt: Path) -> Iterator[ServerProcess]:
    worker = start_server(["expert_workers", "serve", "--model", str(tiny_ckpt), "--shard", "0/1", "--port", "0",
                           "--expert-bits", "16", "--no-progress", "--inject-delay-ms", "15"])
    try:
        server = start_server(["coordinator", "serve", "--model", str(tiny_ckpt), "--workers", worker.address,
                               "--port", "0", "--device", "cpu", "--attn-bits", "16", "--experts-per-layer", "1",
                               "--prefetch", "1", "--no-zero-copy", "--max-queue", str(MAX_QUEUE)],
                              env={"OMP_NUM_THREADS": "1"})
        yield server
        assert server.stop() == 0
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def client(coordinator: ServerProcess) -> Iterator[Client]:
    with Client(coordinator.address, timeout_s=120) as c:
        yield c


def wait_for(client: Client, condition: Any, timeout_s: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats()
        if condition(stats):
            return stats
        assert time.monotonic() < deadline, f"{what}: {stats}"
        time.sleep(0.05)


def test_burst_of_four_times_capacity_rejects_exactly_the_excess(tiny_ckpt: Path, client: Client) -> None:
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(4 * MAX_QUEUE)]
    reference = reference_model(tiny_ckpt)
    expected = {tuple(p): greedy(reference, p, 6) for p in prompts}
    base = client.stats()
    holder = client.stream(prompt_token_ids=[1, 2, 3], max_new_tokens=240)
    # decoding: it holds the engine until cancelled (the iterator is kept: dropping it would cancel the stream)
    tokens = iter(holder)
    next(tokens)

    def one(prompt: list[int]) -> tuple[str, list[int], float]:
        start = time.monotonic()
        try:
            ids = client.generate(prompt_token_ids=prompt, max_new_tokens=6).token_ids
            return "OK", ids, time.monotonic() - start
        except ClientError as e:
            return e.code, [], time.monotonic() - start

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        futures = {pool.submit(one, p): p for p in prompts}
        # The excess is turned away while the holder still decodes; exactly MAX_QUEUE wait behind it.
        stats = wait_for(client, lambda s: s["requests_rejected"] - base["requests_rejected"] >= 3 * MAX_QUEUE
                         and s["queue_depth"] == MAX_QUEUE + 1, 30, "burst not sorted out")
        assert stats["max_queue"] == MAX_QUEUE
        # the server has counted the rejections; each error reaches its client thread a moment later
        deadline = time.monotonic() + 10
        while sum(f.done() for f in futures) < 3 * MAX_QUEUE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sum(f.done() for f in futures) == 3 * MAX_QUEUE  # the admitted ones still wait ...
        assert client.stats()["queue_depth"] == MAX_QUEUE + 1  # ... behind the holder, which still decodes
        holder.cancel()
        done, hung = cf.wait(futures, timeout=90)
    assert not hung, f"{len(hung)} requests hung"
    outcomes = [(f.result(), futures[f]) for f in done]
    rejected = [r for r, _ in outcomes if r[0] != "OK"]
    assert len(rejected) == 3 * MAX_QUEUE and {r[0] for r in rejected} == {"RESOURCE_EXHAUSTED"}
    assert max(r[2] for r in rejected) < 10  # at once, not after waiting for the engine
    served = [(r, p) for r, p in outcomes if r[0] == "OK"]
    assert len(served) == MAX_QUEUE and all(r[1] == expected[tuple(p)] for r, p in served)
    stats = client.stats()
    assert stats["requests_rejected"] - base["requests_rejected"] == 3 * MAX_QUEUE and stats["queue_depth"] == 0


CLIENT = """
import sys
from client import Client
with Client(sys.argv[1]) as c:
    for chunk in c.stream(prompt_token_ids=[4, 5, 6], max_new_tokens=200):
        print(chunk.token_id, flush=True)
"""


def disconnect_by_kill(address: str) -> None:
    """A client process that is SIGKILLed after its first streamed token: its connection just drops."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, address], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip().isdigit()
    proc.kill()
    proc.wait(10)


def disconnect_by_leaving(address: str) -> None:
    """A client that stops reading after one token (the stream cancels its call)."""
    with Client(address) as c:
        for _ in c.stream(prompt_token_ids=[4, 5, 6], max_new_tokens=200):
            break


@pytest.mark.parametrize("disconnect", [disconnect_by_kill, disconnect_by_leaving])
def test_client_disconnect_stops_the_decode_and_frees_its_buffers(coordinator: ServerProcess, client: Client,
                                                                  disconnect: Any) -> None:
    base = client.stats()
    disconnect(coordinator.address)
    stats = wait_for(client, lambda s: s["requests_cancelled"] > base["requests_cancelled"], 20,
                     "the server never noticed the disconnect")
    assert stats["requests"] == base["requests"]  # it did not run to its 200 tokens
    assert stats["cancelled_generated_tokens"] - base["cancelled_generated_tokens"] < 200
    assert stats["decode_steps_after_cancel_max"] <= 1  # stopped within one step of the cancel arriving
    stats = wait_for(client, lambda s: s["queue_depth"] == 0, 10, "the cancelled request still holds the engine")
    assert stats["kv_caches_live"] == 0  # its KV cache is gone
    start = time.monotonic()
    r = client.generate(prompt_token_ids=[7, 8], max_new_tokens=3)  # the next request runs at once
    assert len(r.token_ids) == 3 and time.monotonic() - start < 30
    assert client.stats()["kv_caches_live"] == 0
