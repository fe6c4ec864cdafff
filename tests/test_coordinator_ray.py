"""``--ray`` discovery on a real local Ray bound to 127.0.0.1: the coordinator finds the named expert worker
actors, reads their object-store experts zero-copy, and still matches transformers token for token."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coordinator import Coordinator, CoordinatorConfig, GenerateParams
from coordinator.discovery import connect, ray_workers
from coordinator.reference import greedy, reference_model

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def test_ray_discovery_serves_exact_tokens(local_ray: None, tiny_ckpt: Path) -> None:
    from expert_workers.actor import start_expert_worker

    actors = [start_expert_worker(str(tiny_ckpt), f"{i}/2", bits=16, name=f"expert-worker-{i}of2",
                                  namespace="moe-test") for i in range(2)]
    unrelated = start_expert_worker(str(tiny_ckpt), "0/1", bits=16, name="unrelated-actor", namespace="moe-test")
    found = ray_workers("auto", time.monotonic() + 240, prefix="expert-worker", namespace="moe-test")
    assert sorted(found) == sorted(ray.get([a.address.remote() for a in actors]))
    source = connect(None, "auto", 240, {"prefix": "expert-worker", "namespace": "moe-test"})
    try:
        engine = Coordinator(tiny_ckpt, source, CoordinatorConfig(attn_bits=16, experts_per_layer=2))
        reference = reference_model(tiny_ckpt)
        for prompt in ([5, 9, 33], [100, 7]):
            events = engine.generate(GenerateParams(prompt_token_ids=tuple(prompt), max_new_tokens=10))
            assert [e.token_id for e in events[:-1]] == greedy(reference, prompt, 10)
        assert source.stats()["ray_reads"] + source.stats()["zero_copy_reads"] > 0
        engine.close()
    finally:
        source.close()
        for a in [*actors, unrelated]:  # the session's Ray is empty again for the next test
            ray.kill(a)
