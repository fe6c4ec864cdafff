"""CUDA-only paths of the coordinator: pinned staging, the side copy stream with events, cudaHostRegister on a
co-located worker's shared memory, device memory accounting. Skipped without CUDA (run on the lent GPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator import Coordinator, CoordinatorConfig, GenerateParams
from coordinator.reference import greedy, reference_model
from expert_workers.format import EXACT
from expert_workers.source import ExpertSource, make_source
from expert_workers.store import ExpertStore

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PROMPTS = [[5, 9, 33, 70, 100], [200, 3, 4], list(range(10, 40))]


@pytest.fixture(scope="module")
def source(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExpertSource]:
    stores = [ExpertStore(tiny_ckpt, f"{i}/2", EXACT, cache_dir=tmp_path_factory.mktemp("x"), progress=False).load()
              for i in range(2)]
    yield make_source(stores=stores)
    for s in stores:
        s.close()


@pytest.mark.parametrize(("k", "prefetch", "zero_copy"), [(1, 2, False), (1, 2, True), (8, 0, False)])
def test_cuda_exact_with_streams(tiny_ckpt: Path, source: ExpertSource, k: int, prefetch: int,
                                 zero_copy: bool) -> None:
    engine = Coordinator(tiny_ckpt, source, CoordinatorConfig(device="cuda", attn_bits=16, experts_per_layer=k,
                                                                prefetch=prefetch, zero_copy=zero_copy))
    reference = reference_model(tiny_ckpt, device="cuda", experts_implementation="eager")
    try:
        assert engine.cache.arena.is_cuda
        assert engine.transfers._stream is not None
        assert all(t.is_pinned() for t in engine.transfers._staging)
        for prompt in PROMPTS:
            events = engine.generate(GenerateParams(prompt_token_ids=tuple(prompt), max_new_tokens=16))
            assert [e.token_id for e in events[:-1]] == greedy(reference, prompt, 16)
            stats = events[-1].stats
            assert stats["gpu_peak_bytes"] >= engine.cache.nbytes
            assert stats["expert_uses"] == stats["cache_hits"] + stats["cache_misses"]
        if zero_copy:
            assert engine.transfers._registered, "the shared-memory mapping was never registered"
            assert engine.runner.stats()["bytes_zero_copy"] > 0
        engine.cache.check()
    finally:
        engine.close()


def test_registered_shm_copies_asynchronously(source: ExpertSource) -> None:
    """cudaHostRegister on a store's shm view makes it pinned, so the side-stream copy is truly async."""
    from expert_workers.format import ExpertKey

    view = source.host_view(ExpertKey(0, 0))
    assert view is not None
    engine_arena = torch.empty((2, view.numel()), dtype=torch.uint8, device="cuda")
    from coordinator.transfer import Transfers

    transfers = Transfers(source, engine_arena, staging=1, workers=1, timeout_s=10)
    try:
        transfers._register(view)
        assert view.is_pinned()
        load = transfers.start(ExpertKey(0, 0), source.manifest(ExpertKey(0, 0)))
        assert load is not None and load.host is not None
        transfers.land(load, 1)
        transfers.before_compute(1)
        assert torch.equal(engine_arena[1, :view.numel()].cpu(), view)
        x = torch.ones(4, device="cuda")
        assert float(x.sum()) == 4.0  # no stale CUDA error surfaces at the next kernel launch
    finally:
        transfers.close()
