"""CUDA-only paths of the coordinator: pinned staging, the side copy stream with events, cudaHostRegister on a
co-located worker's shared memory, device memory accounting. Skipped without CUDA (run on the lent GPU)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator import Coordinator, CoordinatorConfig, GenerateParams
from coordinator.host_embedding import HostEmbedding
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
        assert isinstance(engine.model.model.embed_tokens, HostEmbedding)  # the table is gathered from the host
        assert all(t.is_pinned() for t in engine.transfers._staging)
        for prompt in PROMPTS:
            events = engine.generate(GenerateParams(prompt_token_ids=tuple(prompt), max_new_tokens=16))
            assert [e.token_id for e in events[:-1]] == greedy(reference, prompt, 16)
            stats = events[-1].stats
            assert stats["gpu_peak_bytes"] >= engine.cache.nbytes
            assert stats["gpu_peak_reserved_bytes"] >= stats["gpu_peak_bytes"]  # the allocator holds what it lends
            assert stats["expert_uses"] == stats["cache_hits"] + stats["cache_misses"]
        if zero_copy:
            assert engine.transfers._registered, "the shared-memory mapping was never registered"
            assert engine.runner.stats()["bytes_zero_copy"] > 0
        engine.cache.check()
    finally:
        engine.close()


@contextlib.contextmanager
def capped(ckpt: Path, source: ExpertSource, room_mib: int) -> Iterator[tuple[Coordinator, float, bool]]:
    """(engine, cap in GiB, whether segments are expandable), set up as ``coordinator serve`` does: expandable
    segments before loading, a cap of what is live now + the context reserve + ``room_mib``; the caller calls
    ``cap_device_memory``. Afterwards the allocator is as the later tests expect it: uncapped, fixed segments."""
    from coordinator import device_memory
    from coordinator.config import GIB
    from coordinator.engine import CUDA_CONTEXT_RESERVE

    torch.cuda.empty_cache()
    cap_gb = (torch.cuda.memory_allocated() + CUDA_CONTEXT_RESERVE + room_mib * 2**20) / GIB
    expandable = device_memory.expandable_segments()
    engine = Coordinator(ckpt, source, CoordinatorConfig(device="cuda", gpu_memory_gb=cap_gb))
    try:
        yield engine, cap_gb, expandable
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        device_memory.expandable_segments(False)
        torch.cuda.empty_cache()
        engine.close()


def test_capped_allocator_frees_its_cache_instead_of_growing(tiny_ckpt: Path, source: ExpertSource) -> None:
    """``cap_device_memory`` holds torch's allocator to ``gpu_memory_gb`` less the context reserve: blocks of
    growing sizes, each freed before the next (what a long prefill does), would leave every one cached; capped,
    the allocator frees them and its reservation stays under the limit, and a block past the limit is refused
    with torch's OutOfMemoryError, not taken from the device."""
    from coordinator import device_memory
    from coordinator.config import GIB
    from coordinator.engine import CUDA_CONTEXT_RESERVE

    with capped(tiny_ckpt, source, 512) as (engine, cap_gb, expandable):
        limit = engine.cap_device_memory()
        assert limit == int(cap_gb * GIB) - CUDA_CONTEXT_RESERVE
        torch.cuda.reset_peak_memory_stats()
        for mib in range(64, 320, 32):  # 1.5 GiB in all, none of it reusable by the next size
            block = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda")
            del block
        assert torch.cuda.max_memory_reserved() <= limit
        if expandable:  # blocks now come from expandable segments
            block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
            assert any(seg.get("is_expandable") for seg in torch.cuda.memory_snapshot())
            del block
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(limit, dtype=torch.uint8, device="cuda")
        assert "MiB reserved" in device_memory.by_pool(torch.device("cuda"))  # what an OOM's log line shows


def _fill_device(leave_mib: int) -> list[torch.Tensor]:
    """Takes every byte the capped allocator will still lend (big blocks, then smaller ones, until it refuses),
    then gives ``leave_mib`` MiB of the 2 MiB blocks back."""
    held: list[torch.Tensor] = []
    for size in (64 * 2**20, 2 * 2**20, 2**19, 2**12):
        while True:
            try:
                held.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
            except torch.cuda.OutOfMemoryError:
                break
    back = set([i for i, t in enumerate(held) if t.numel() == 2 * 2**20][: leave_mib // 2])
    return [t for i, t in enumerate(held) if i not in back]


def test_out_of_memory_fails_one_request_and_the_engine_serves_on(kernel_ckpt: Path,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """Under the cap, a request that finds the device full fails with torch's OutOfMemoryError (the server
    answers RESOURCE_EXHAUSTED) wherever it runs out: in the prefill, or while capturing its CUDA graphs (they
    are dropped first, so each request captures anew), depending on how much is left. Once memory is back the
    same engine gives its first greedy tokens again, and counts the failures."""
    from expert_workers.format import INT2

    store = ExpertStore(kernel_ckpt, "0/1", INT2, cache_dir=tmp_path_factory.mktemp("xo"), progress=False).load()
    params, failed = GenerateParams(prompt_token_ids=tuple(PROMPTS[2]), max_new_tokens=12), 0
    try:
        with capped(kernel_ckpt, make_source(stores=[store]), 1024) as (engine, _, _):
            assert engine.decoder is not None and engine.decoder.graphs_wanted
            engine.cap_device_memory()
            want = [e.token_id for e in engine.generate(params)[:-1]]
            for leave_mib in (0, 2, 8, 32):
                engine.decoder.graphs.clear()  # the next request captures its graphs while the device is full
                held = _fill_device(leave_mib)
                try:
                    engine.generate(params)
                except torch.cuda.OutOfMemoryError:
                    failed += 1
                del held
                torch.cuda.empty_cache()
                assert [e.token_id for e in engine.generate(params)[:-1]] == want, leave_mib
            assert failed >= 1, "a full device should have failed at least the first request"
            assert engine.stats()["requests_failed"] == failed
            engine.cache.check()
    finally:
        store.close()


def test_host_embedding_gathers_from_pinned_memory_in_a_graph() -> None:
    """The GPU reads the pinned host table by itself: the same rows as a device table, also replayed from a
    CUDA graph with a new token id written into the captured input."""
    weight = torch.randn(1000, 4096, device="cuda").to(torch.bfloat16)
    emb = HostEmbedding(weight)
    assert emb.__dict__["table"].is_pinned() and not emb.__dict__["table"].is_cuda
    ids = torch.tensor([[3, 999, 0, 3]], device="cuda")
    assert torch.equal(emb(ids), weight[ids])
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    out = torch.empty(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out.copy_(emb(tok))  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(emb(tok))
    for t in (5, 777, 999):
        tok.fill_(t)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0, 0], weight[t])


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


# -- the fast paths chosen at start on CUDA (coordinator.moe.select_path, coordinator.model.PackedLinear) -----
@pytest.fixture(scope="module")
def kernel_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral whose dims the Triton kernels read (K a multiple of 2 groups of 64), in float16."""
    from modelzoo.tiny import TinySpec, build_tiny_random

    spec = TinySpec(layers=3, hidden=256, intermediate=512, heads=4, kv_heads=2, dtype="float16", seed=3)
    return build_tiny_random(tmp_path_factory.mktemp("kernel") / "ckpt", spec)


def _hqq_reference_paths(engine: Coordinator) -> None:
    """Puts the reference paths back on a built engine: hqq's dequantize + matmul for experts and attention."""
    from coordinator.model import PackedLinear
    from coordinator.moe import HQQ_PATH

    engine.runner.path = HQQ_PATH
    engine.runner._moe = engine.runner._moe_per_expert
    for layer in engine.model.model.layers:
        for name, mod in list(layer.self_attn.named_children()):
            if isinstance(mod, PackedLinear):
                setattr(layer.self_attn, name, mod.hqq)


@pytest.mark.parametrize(("k", "prefetch", "zero_copy"), [(8, 0, True), (2, 2, True), (1, 1, False)])
def test_fast_paths_match_hqq(kernel_ckpt: Path, tmp_path_factory: pytest.TempPathFactory, k: int, prefetch: int,
                              zero_copy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same logits (fp16 rounding apart) and the same cache behaviour through the Triton paths as through hqq's;
    k=1 < top-2 makes the layer path fall back to per-expert GEMV calls."""
    from coordinator.model import PackedLinear
    from expert_workers.format import INT2

    store = ExpertStore(kernel_ckpt, "0/1", INT2, cache_dir=tmp_path_factory.mktemp("x2"), progress=False).load()
    src = make_source(stores=[store])
    cfg = CoordinatorConfig(device="cuda", attn_bits=4, experts_per_layer=k, prefetch=prefetch, zero_copy=zero_copy,
                            decode="transformers")  # the graph decoder has its own test below
    fast = Coordinator(kernel_ckpt, src, cfg)
    monkeypatch.setattr("coordinator.model.FUSE_QKV", False)  # the reference keeps hqq's separate q/k/v
    slow = Coordinator(kernel_ckpt, src, cfg)
    try:
        assert fast.runner.path.name == "gemv_layer"
        assert any(isinstance(m, PackedLinear) for m in fast.model.modules())
        assert all(hasattr(layer.self_attn, "qkv_proj") for layer in fast.model.model.layers)
        _hqq_reference_paths(slow)
        for prompt in ([5, 9, 33], list(range(10, 30))):  # 3 tokens: GEMV everywhere; 20: prefill fallbacks
            kv_f, kv_s = fast.new_kv_cache(), slow.new_kv_cache()
            tokens = list(prompt)
            with torch.inference_mode():
                lf, ls = fast.step(tokens, kv_f), slow.step(tokens, kv_s)
                for _ in range(8):
                    rel = float((lf - ls).norm() / ls.norm())
                    assert rel < 2e-2, rel
                    nxt = int(ls.argmax())  # both follow the reference's tokens, so errors cannot compound
                    lf, ls = fast.step([nxt], kv_f), slow.step([nxt], kv_s)
        sf, ss = fast.runner.stats(), slow.runner.stats()
        assert sf["expert_uses"] == ss["expert_uses"] == sf["cache_hits"] + sf["cache_misses"]
        if k == 8:  # smaller caches may evict differently: the layer path protects all of a step's experts
            assert sf["cache_hits"] == ss["cache_hits"]
        fast.cache.check()
        x = torch.ones(4, device="cuda")
        assert float(x.sum()) == 4.0  # no stale CUDA error (e.g. from registering shm twice in one process)
    finally:
        fast.close()
        slow.close()
        store.close()
    from coordinator.pinning import PROCESS_REGISTRY

    assert not any(id(e.transfers) in r.owners for e in (fast, slow) for r in PROCESS_REGISTRY.ranges)


@pytest.mark.parametrize("spec", ["INT3", "INT3_M8", "INT2_M8"])
def test_planes_and_tables_run_the_graphed_gemv(kernel_ckpt: Path, tmp_path_factory: pytest.TempPathFactory,
                                                spec: str) -> None:
    """3-bit experts (two planes), and 3- and 2-bit experts with 8-bit scale/zero tables, go through the fused
    GEMV and CUDA graphs: the logits of hqq's own dequantize + matmul (on the decoded tables), fp16 rounding
    apart, with misses and prefetches on the way."""
    from expert_workers import format as fmt

    store = ExpertStore(kernel_ckpt, "0/1", getattr(fmt, spec), cache_dir=tmp_path_factory.mktemp("x3"),
                        progress=False).load()
    src = make_source(stores=[store])
    cfg = CoordinatorConfig(device="cuda", attn_bits=16, experts_per_layer=2, prefetch=1)
    fast = Coordinator(kernel_ckpt, src, cfg)
    slow = Coordinator(kernel_ckpt, src, dataclasses.replace(cfg, decode="transformers"))
    try:
        assert fast.runner.path.name == "gemv_layer" and fast.decoder is not None and fast.decoder.graphs_wanted
        from coordinator.gpu_kernels import layout_of
        from expert_workers.format import ExpertKey

        assert layout_of(src.manifest(ExpertKey(0, 0))).meta8 == spec.endswith("_M8")
        _hqq_reference_paths(slow)
        kv_f, kv_s = fast.new_kv_cache(), slow.new_kv_cache()
        with torch.inference_mode():
            lf, ls = fast.step(list(range(10, 30)), kv_f), slow.step(list(range(10, 30)), kv_s)
            for _ in range(8):
                assert float((lf - ls).norm() / ls.norm()) < 2e-2
                nxt = int(ls.argmax())
                lf, ls = fast.step([nxt], kv_f), slow.step([nxt], kv_s)
        assert fast.runner.stats()["cache_misses"] > 0
        fast.cache.check()
    finally:
        fast.close()
        slow.close()
        store.close()

def test_chunked_prefill_on_gpu_gives_the_one_pass_logits(kernel_ckpt: Path,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """A 20-token prompt in chunks of 6 (the last one partial; the chunked dequantize path for each chunk of
    more than 4 tokens) gives the single pass's logits, fp16 rounding apart, and the graphed decode after it
    continues from the same KV."""
    from expert_workers.format import INT2

    store = ExpertStore(kernel_ckpt, "0/1", INT2, cache_dir=tmp_path_factory.mktemp("xc"), progress=False).load()
    src = make_source(stores=[store])
    cfg = CoordinatorConfig(device="cuda", attn_bits=4, experts_per_layer=2, prefetch=2)
    chunked = Coordinator(kernel_ckpt, src, dataclasses.replace(cfg, prefill_chunk=6))
    whole = Coordinator(kernel_ckpt, src, cfg)
    try:
        kv_c, kv_w = chunked.new_kv_cache(), whole.new_kv_cache()
        with torch.inference_mode():
            lc, lw = chunked.step(list(range(10, 30)), kv_c), whole.step(list(range(10, 30)), kv_w)
            for _ in range(6):
                assert float((lc - lw).norm() / lw.norm()) < 2e-2
                nxt = int(lw.argmax())
                lc, lw = chunked.step([nxt], kv_c), whole.step([nxt], kv_w)
        chunked.cache.check()
    finally:
        chunked.close()
        whole.close()
        store.close()


# -- the CUDA-graph decode path (coordinator.decode) -------------------------------------------------------
def follow_together(engine: Coordinator, reference: Coordinator, prompts: tuple[list[int], ...],
                    steps: int = 12) -> None:
    """Each prompt, then ``steps`` tokens, through both engines: the logits agree within 2% (relative norm)
    at every step. Both take the reference's argmax as their next token, so errors cannot compound."""
    for prompt in prompts:
        kv_e, kv_r = engine.new_kv_cache(), reference.new_kv_cache()
        with torch.inference_mode():
            le, lr = engine.step(prompt, kv_e), reference.step(prompt, kv_r)
            for _ in range(steps):
                rel = float((le - lr).norm() / lr.norm())
                assert rel < 2e-2, rel
                nxt = int(lr.argmax())
                le, lr = engine.step([nxt], kv_e), reference.step([nxt], kv_r)


@pytest.mark.parametrize(("k", "prefetch", "zero_copy", "ahead", "admission"),
                         [(8, 0, True, 1, False), (2, 2, True, 1, False), (3, 1, False, 1, False),
                          (2, 2, True, 2, False), (3, 2, True, 1, True)])
def test_graph_decode_matches_transformers(kernel_ckpt: Path, tmp_path_factory: pytest.TempPathFactory, k: int,
                                           prefetch: int, zero_copy: bool, ahead: int, admission: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """decode "graphs" (static buffers, one CUDA graph per segment, experts from the arena) gives the logits of
    transformers' own forward on the same engine settings, step after step, over requests that reuse the
    captured graphs and sequences that outgrow a span (new graphs); the cache stays consistent and the
    counters add up. ahead 2: the far guesses go only into an idle copy engine (the transformers path
    ignores them). admission: misses the cache refuses are computed from prefetch spares."""
    import coordinator.decode
    from expert_workers.format import INT2

    monkeypatch.setattr(coordinator.decode, "MIN_SPAN", 16)  # spans 16, 32: the 20-token prompt crosses into 32

    store = ExpertStore(kernel_ckpt, "0/1", INT2, cache_dir=tmp_path_factory.mktemp("xg"), progress=False).load()
    src = make_source(stores=[store])
    base = dict(device="cuda", attn_bits=4, experts_per_layer=k, prefetch=prefetch, zero_copy=zero_copy,
                admission=admission)
    graphs = Coordinator(kernel_ckpt, src, CoordinatorConfig(**base, prefetch_ahead=ahead))  # auto: graphs apply
    plain = Coordinator(kernel_ckpt, src, CoordinatorConfig(**base, decode="transformers"))
    try:
        assert graphs.decoder is not None and graphs.decoder.graphs_wanted
        follow_together(graphs, plain, ([5, 9, 33], list(range(10, 30)), [7]))
        assert sorted(graphs.decoder.graphs) == [16, 32]
        stats = graphs.runner.stats()
        assert stats["expert_uses"] == stats["cache_hits"] + stats["cache_misses"] > 0
        assert stats["prefetch_used"] <= stats["prefetch_issued"]
        assert (stats["cache_not_admitted"] > 0) == admission
        events = graphs.generate(GenerateParams(prompt_token_ids=(1, 2, 3), max_new_tokens=8, temperature=0.7, seed=3))
        assert len(events) == 9 and events[-1].stats["generated_tokens"] == 8
        graphs.cache.check()
        x = torch.ones(4, device="cuda")
        assert float(x.sum()) == 4.0
    finally:
        graphs.close()
        plain.close()
        store.close()


@pytest.fixture
def deterministic_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """The down kernel without split-K: its fp32 atomics add in a different order from run to run, so two
    runs of the same decode differ in the last bits (and may flip a near-tie token) whatever the decoder does."""
    import dataclasses

    import coordinator.gpu_kernels as gk

    monkeypatch.setattr(gk, "DOWN", dataclasses.replace(gk.DOWN, split_k=1))


@pytest.mark.parametrize(("k", "prefetch", "admission"), [(2, 2, False), (3, 0, False), (3, 2, True)])
def test_graph_speculation_is_bit_exact(kernel_ckpt: Path, tmp_path_factory: pytest.TempPathFactory, k: int,
                                        prefetch: int, admission: bool, deterministic_down: None) -> None:
    """Segments queued before their layer's routing is read (the default) give the very logits of waiting
    for it, step after step through misses and evictions; the stale ones were redone."""
    from expert_workers.format import INT2

    store = ExpertStore(kernel_ckpt, "0/1", INT2, cache_dir=tmp_path_factory.mktemp("xs"), progress=False).load()
    src = make_source(stores=[store])
    base = dict(device="cuda", attn_bits=4, experts_per_layer=k, prefetch=prefetch, decode="graphs",
                admission=admission)
    spec = Coordinator(kernel_ckpt, src, CoordinatorConfig(**base))
    wait = Coordinator(kernel_ckpt, src, CoordinatorConfig(**base, speculate=False))
    try:
        for prompt in ([5, 9, 33], list(range(10, 30))):
            kv_s, kv_w = spec.new_kv_cache(), wait.new_kv_cache()
            with torch.inference_mode():
                ls, lw = spec.step(prompt, kv_s), wait.step(prompt, kv_w)
                for _ in range(16):
                    assert torch.equal(ls, lw)
                    nxt = int(lw.argmax())
                    ls, lw = spec.step([nxt], kv_s), wait.step([nxt], kv_w)
        s, w = spec.stats(), wait.stats()
        assert s["decode_segments_speculated"] > s["decode_segments_redone"] > 0
        assert w["decode_segments_speculated"] == w["decode_segments_redone"] == 0
        assert s["cache_misses"] > 0 and (prefetch or s["cache_misses"] == w["cache_misses"])  # same decisions
        spec.cache.check()
    finally:
        spec.close()
        wait.close()
        store.close()


def test_device_sampling_draws_the_host_tokens() -> None:
    """The sampler picks on the GPU (no sync: the decoder feeds the token to its next step) the token it picks
    on the CPU for the same seed: greedy, temperature, top-p (a full sort there, a growing top-k here)."""
    from coordinator.generate import Sampler

    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(32000, generator=gen) * s for s in (0.5, 2.0, 8.0) for _ in range(100)]
    for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (0.7, 0.9), (1.3, 0.5)):
        host, device = Sampler(temperature, top_p, seed=5), Sampler(temperature, top_p, seed=5)
        picked = torch.cat([device.pick(x.cuda()) for x in logits]).tolist()
        assert picked == [host(x) for x in logits], (temperature, top_p)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_pipelined_graph_decode_gives_the_unpipelined_tokens(kernel_ckpt: Path,
                                                             tmp_path_factory: pytest.TempPathFactory,
                                                             temperature: float, deterministic_down: None) -> None:
    """Step t+1 queued with token t still on the device: the same tokens, seed for seed, and the same cache
    traffic as reading each token on the host first."""
    from expert_workers.format import INT2

    store = ExpertStore(kernel_ckpt, "0/1", INT2, cache_dir=tmp_path_factory.mktemp("xp"), progress=False).load()
    src = make_source(stores=[store])
    base = dict(device="cuda", attn_bits=4, experts_per_layer=2, prefetch=2, decode="graphs")
    engines = [Coordinator(kernel_ckpt, src, CoordinatorConfig(**base, pipeline=p)) for p in (True, False)]
    try:
        for prompt in ([5, 9, 33], list(range(10, 30))):
            params = GenerateParams(prompt_token_ids=tuple(prompt), max_new_tokens=24, temperature=temperature,
                                    seed=11)
            piped, plain = (e.generate(params) for e in engines)
            assert [e.token_id for e in piped] == [e.token_id for e in plain]
            if plain[-1].finish_reason == "length":  # after a stop token the pipelined one ran a discarded step
                assert piped[-1].stats["cache_misses"] == plain[-1].stats["cache_misses"] > 0
        engines[0].cache.check()
    finally:
        for e in engines:
            e.close()
        store.close()


def test_packed_lm_head_in_the_graph_decoder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``lm_head_bits`` 4 on CUDA: lm_head becomes a ``PackedLinear`` (the Triton GEMV over its packed codes,
    also inside the decoder's CUDA graphs) and gives, step after step, the logits of hqq's own dequantize +
    matmul on the same codes; the shell holds fewer bytes than with the fp16 lm_head (~3.5 of 16 bits a weight
    at 4 bits, g64)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from coordinator.model import PackedLinear, non_expert_bytes
    from expert_workers.format import INT2

    torch.manual_seed(0)
    # an even vocabulary (4-bit packing needs it); transformers' default init keeps the routers ~1e-2 clear of
    # ties, where TinySpec's wider draw comes within 3e-4 and a rounding difference flips an expert (NOTES item 81)
    ckpt = tmp_path_factory.mktemp("lm_head") / "ckpt"
    MixtralForCausalLM(MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=256,
                                     tie_word_embeddings=False)).half().save_pretrained(ckpt)
    store = ExpertStore(ckpt, "0/1", INT2, cache_dir=tmp_path_factory.mktemp("xl"), progress=False).load()
    src = make_source(stores=[store])
    base = dict(device="cuda", attn_bits=4, experts_per_layer=3, prefetch=2)
    graphs = Coordinator(ckpt, src, CoordinatorConfig(**base, lm_head_bits=4))
    plain = Coordinator(ckpt, src, CoordinatorConfig(**base, lm_head_bits=4, decode="transformers"))
    full = Coordinator(ckpt, src, CoordinatorConfig(**base, decode="transformers"))
    try:
        assert graphs.decoder is not None and isinstance(graphs.model.lm_head, PackedLinear)
        assert non_expert_bytes(full.model) - non_expert_bytes(graphs.model) > 512 * 256 * 2 * 0.6
        reserve = [e._workspace_bytes(torch.float16, e.runner.manifests) for e in (graphs, full)]
        assert reserve[0] == reserve[1]  # the GEMV dequantizes nothing: no lm_head-sized workspace
        plain.model.lm_head = plain.model.lm_head.hqq  # the reference: hqq's dequantize + matmul
        follow_together(graphs, plain, ([5, 9, 33], list(range(10, 30))))
        graphs.cache.check()
    finally:
        graphs.close()
        plain.close()
        full.close()
        store.close()
