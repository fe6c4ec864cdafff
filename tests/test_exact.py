"""Greedy tokens of the coordinator equal transformers' own Mixtral on the same weights, token for token.

In-process (InProcessSource over two ExpertStore shards); test_coordinator.py repeats the check through real
worker and coordinator processes. Covers: k=1 (nearly every use a miss) and k=8, prefetch on and off, the
zero-copy and staging transfer paths, both checkpoint layouts (+ sharded safetensors), tied embeddings
(code-moe-22m), and hqq-quantized experts and attention against a reference on the dequantized weights.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator import Coordinator, CoordinatorConfig, GenerateParams
from coordinator.engine import load_tokenizer
from coordinator.reference import expert_weights, greedy, reference_model
from expert_workers.format import EXACT, INT2, INT3, INT3_M8, ExpertKey, QuantSpec
from expert_workers.source import ExpertSource, make_source
from expert_workers.store import ExpertStore
from modelzoo.tiny import TinySpec, build_tiny_random

CODE_MOE = Path(__file__).resolve().parents[2] / "shared" / "models" / "code-moe-22m"
TINY_PROMPTS = [[5, 9, 33, 70, 100], [200, 3, 4], list(range(10, 40))]
NEW_TOKENS = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one intra-op thread, and a shared 2-core machine stays responsive."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def open_stores(ckpt: Path, spec: QuantSpec, shards: int, cache_dir: Path) -> list[ExpertStore]:
    return [ExpertStore(ckpt, f"{i}/{shards}", spec, cache_dir=cache_dir, progress=False).load()
            for i in range(shards)]


@pytest.fixture(scope="module")
def tiny_exact(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExpertSource]:
    stores = open_stores(tiny_ckpt, EXACT, 2, tmp_path_factory.mktemp("experts"))
    yield make_source(stores=stores)
    for s in stores:
        s.close()


def generated(engine: Coordinator, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    events = engine.generate(GenerateParams(prompt_token_ids=tuple(prompt), max_new_tokens=n))
    assert events[-1].token_id is None and events[-1].finish_reason in ("stop", "length")
    return [e.token_id for e in events[:-1]]  # type: ignore[misc]


def assert_matches(ckpt: Path, source: ExpertSource, reference: torch.nn.Module, prompts: list[list[int]],
                   config: CoordinatorConfig) -> dict[str, float]:
    engine = Coordinator(ckpt, source, config)
    try:
        for prompt in prompts:
            assert generated(engine, prompt) == greedy(reference, prompt, NEW_TOKENS), (prompt, config)
            engine.cache.check()
        return engine.stats()
    finally:
        engine.close()


@pytest.mark.parametrize(("k", "prefetch", "zero_copy", "decode", "ahead", "eviction"),
                         [(1, 0, True, "transformers", 1, "lrfu"), (1, 2, False, "transformers", 1, "lrfu"),
                          (8, 0, False, "transformers", 1, "lrfu"), (8, 2, True, "transformers", 1, "lrfu"),
                          (3, 3, False, "transformers", 1, "lru"), (1, 2, True, "static", 1, "lrfu"),
                          (8, 0, False, "static", 1, "lrfu"), (2, 1, False, "static", 1, "lru"),
                          (2, 2, True, "static", 2, "lrfu"), (1, 1, False, "static", 2, "lrfu")])
def test_tiny_exact(tiny_ckpt: Path, tiny_exact: ExpertSource, k: int, prefetch: int, zero_copy: bool,
                    decode: str, ahead: int, eviction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """decode "static" is coordinator.decode (the CUDA-graph code, run eagerly): same tokens as transformers,
    with attention spans of 8, 16, 32, 64 positions crossed as the sequences grow; either eviction policy."""
    import coordinator.decode

    monkeypatch.setattr(coordinator.decode, "MIN_SPAN", 8)
    reference = reference_model(tiny_ckpt)  # the checkpoint's own experts, as from_pretrained loads them
    cfg = CoordinatorConfig(attn_bits=16, experts_per_layer=k, prefetch=prefetch, zero_copy=zero_copy,
                            decode=decode, prefetch_ahead=ahead, eviction=eviction)
    stats = assert_matches(tiny_ckpt, tiny_exact, reference, TINY_PROMPTS, cfg)
    assert stats["cache_misses"] > 0
    if prefetch:
        assert 0 < stats["prefetch_used"] <= stats["prefetch_issued"]
    if decode == "static" and k >= 2:  # experts through the rows table, segments queued speculatively
        assert stats["decode_segments_speculated"] > stats["decode_segments_redone"] > 0


@pytest.mark.parametrize(("decode", "zero_copy"), [("transformers", False), ("static", True)])
def test_admission_keeps_tokens_exact(tiny_ckpt: Path, tiny_exact: ExpertSource, decode: str,
                                      zero_copy: bool) -> None:
    """With admission, misses the cache does not admit wait in prefetch spares instead of evicting: the tokens
    stay transformers', every buffer keeps one owner (``cache.check`` after each prompt), and the prefetch
    counters count only prefetches."""
    cfg = CoordinatorConfig(attn_bits=16, experts_per_layer=2, prefetch=2, decode=decode, zero_copy=zero_copy,
                            admission=True)
    stats = assert_matches(tiny_ckpt, tiny_exact, reference_model(tiny_ckpt), TINY_PROMPTS, cfg)
    assert stats["cache_not_admitted"] > 0 and stats["cache_misses"] > 0
    assert 0 < stats["prefetch_used"] <= stats["prefetch_issued"]
    assert cfg.admits_by_worth and not cfg.with_(eviction="lru").admits_by_worth  # lru admits every miss


@pytest.mark.parametrize(("chunk", "decode"), [(7, "transformers"), (4, "static")])
def test_chunked_prefill_gives_the_one_pass_tokens(tiny_ckpt: Path, tiny_exact: ExpertSource, chunk: int,
                                                  decode: str) -> None:
    """A prompt longer than ``prefill_chunk`` runs as several forward passes over one KV cache (30 tokens: 5
    chunks of 7 or 8 of 4, the last one partial): the same tokens as transformers' single pass, with every
    cache slot a miss now and then."""
    cfg = CoordinatorConfig(attn_bits=16, experts_per_layer=2, prefetch=2, decode=decode, prefill_chunk=chunk)
    stats = assert_matches(tiny_ckpt, tiny_exact, reference_model(tiny_ckpt), TINY_PROMPTS, cfg)
    assert stats["cache_misses"] > 0 and stats["prompt_tokens"] == sum(map(len, TINY_PROMPTS))


def test_prefill_chunk_bounds_the_memory_reserve(tiny_ckpt: Path, tiny_exact: ExpertSource) -> None:
    """The activations reserve follows the chunk, not max_seq_len: with it, the same budget buys more slots."""
    probe = Coordinator(tiny_ckpt, tiny_exact, CoordinatorConfig(attn_bits=16, experts_per_layer=1))
    dtype, mc = probe.model.dtype, probe.model.config
    fixed = (probe.stats()["non_expert_bytes"] + probe._kv_bytes(dtype)
             + probe._workspace_bytes(dtype, probe.runner.manifests))  # at chunk 512 > the model's 256 positions
    budget, slot = (fixed + 12 * probe.cache.slot_bytes) / 2**30, probe.cache.slot_bytes
    probe.close()

    def slots(chunk: int) -> int:
        engine = Coordinator(tiny_ckpt, tiny_exact, CoordinatorConfig(attn_bits=16, gpu_memory_gb=budget,
                                                                      prefill_chunk=chunk, repartition_every=0))
        try:
            return engine.stats()["cache_slots"]
        finally:
            engine.close()

    full = slots(4096)
    assert full == 12 - 2  # two spares for prefetch 2
    # 8 positions' activations instead of the model's 256 (max_position_embeddings)
    freed = 8 * (mc.max_position_embeddings - 8) * (mc.hidden_size + 2 * mc.intermediate_size) * dtype.itemsize
    assert slots(8) == min(32, full + freed // slot)


@pytest.mark.parametrize("speculate", [False, True])
def test_static_speculation_is_redone_on_a_stale_row(tiny_ckpt: Path, tiny_exact: ExpertSource,
                                                    speculate: bool) -> None:
    """With k = 2 of 8 most layers miss. A speculative segment that gathered a row the cache then moved is
    queued again (same tokens as transformers); without speculation nothing is redone."""
    cfg = CoordinatorConfig(attn_bits=16, experts_per_layer=2, prefetch=2, decode="static", speculate=speculate)
    stats = assert_matches(tiny_ckpt, tiny_exact, reference_model(tiny_ckpt), TINY_PROMPTS, cfg)
    layers = json.loads((tiny_ckpt / "config.json").read_text())["num_hidden_layers"]
    speculated = stats["decode_segments_speculated"]
    if speculate:  # every segment after the first of each decode step
        assert speculated % layers == 0 and speculated >= layers * (NEW_TOKENS - 1) * len(TINY_PROMPTS)
        assert 0 < stats["decode_segments_redone"] < speculated
    else:
        assert speculated == stats["decode_segments_redone"] == 0


@pytest.mark.parametrize("decode", ["static", "transformers"])
def test_memory_budget_spreads_odd_slots_exactly(tiny_ckpt: Path, tiny_exact: ExpertSource, decode: str) -> None:
    """A budget that buys a number of slots the layer count does not divide gives some layers k + 1 (not all
    k): every bought slot is used, and the uneven LRU still gives transformers' tokens."""
    probe = Coordinator(tiny_ckpt, tiny_exact, CoordinatorConfig(attn_bits=16, experts_per_layer=1))
    base, slot, layers = (probe.stats()["non_expert_bytes"], probe.cache.slot_bytes,
                          probe.model.config.num_hidden_layers)
    probe.close()
    totals = []
    for extra in (0, 1, layers + 1):  # the fixed costs are unknown here; each extra slot's worth buys one
        budget = (base + 4_000_000 + (layers + 2 + extra) * slot) / 2**30
        cfg = CoordinatorConfig(attn_bits=16, gpu_memory_gb=budget, prefetch=2, decode=decode, repartition_every=0)
        if extra < layers:
            engine = Coordinator(tiny_ckpt, tiny_exact, cfg)
            totals.append(engine.stats()["cache_slots"])
            engine.close()
            continue
        assert totals[1] == totals[0] + 1
        stats = assert_matches(tiny_ckpt, tiny_exact, reference_model(tiny_ckpt), TINY_PROMPTS, cfg)
        assert stats["cache_slots"] == totals[0] + extra and stats["cache_slots"] % layers != 0
        k = stats["slots_per_layer"]
        assert k * layers < stats["cache_slots"] < (k + 1) * layers and stats["cache_misses"] > 0


@pytest.mark.parametrize("decode", ["static", "transformers"])
def test_slots_planned_from_traffic_stay_exact(tiny_ckpt: Path, tiny_exact: ExpertSource, decode: str) -> None:
    """A budget-sized cache re-planned every 3 steps (coordinator.partition): buffers move between layers
    mid-request (evicting what the shrinking layers held, rows the static decoder's table still names), the
    total and every layer's floor of top-k slots hold, and the tokens stay transformers'."""
    probe = Coordinator(tiny_ckpt, tiny_exact, CoordinatorConfig(attn_bits=16, experts_per_layer=1))
    base, slot, mc = probe.stats()["non_expert_bytes"], probe.cache.slot_bytes, probe.model.config
    probe.close()
    budget = (base + 4_000_000 + (4 * mc.num_hidden_layers + 2) * slot) / 2**30  # ~4 of 8 experts per layer
    cfg = CoordinatorConfig(attn_bits=16, gpu_memory_gb=budget, prefetch=2, decode=decode, repartition_every=3)
    stats = assert_matches(tiny_ckpt, tiny_exact, reference_model(tiny_ckpt), TINY_PROMPTS, cfg)
    slots = [int(stats[f"layer{i}_slots"]) for i in range(mc.num_hidden_layers)]
    assert stats["cache_slots_moved"] > 0 and sum(slots) == stats["cache_slots"]
    assert len(set(slots)) > 1 and min(slots) == stats["slots_per_layer"] >= mc.num_experts_per_tok
    if decode == "static":
        assert stats["decode_segments_redone"] > 0


@pytest.mark.parametrize("decode", ["static", "transformers"])
def test_pipelined_decode_emits_each_token_while_the_next_step_runs(tiny_ckpt: Path, tiny_exact: ExpertSource,
                                                                    decode: str) -> None:
    """Pipelined, token t is emitted once step t+1 took it as input (from the device, not the host); not
    pipelined, the input still holds token t-1. Same tokens either way, equal to transformers'; a stop token
    ends both at the same place, the pipelined one after one discarded step."""
    prompt = TINY_PROMPTS[0]
    expected = greedy(reference_model(tiny_ckpt), prompt, NEW_TOKENS)
    inputs: dict[bool, list[int]] = {}
    lengths: dict[bool, int] = {}
    looked_up: dict[bool, list[float]] = {}
    for pipeline in (True, False):
        engine = Coordinator(tiny_ckpt, tiny_exact, CoordinatorConfig(attn_bits=16, experts_per_layer=2,
                                                                      decode=decode, pipeline=pipeline))
        try:
            seen: list[int] = []
            uses: list[float] = []
            tok = engine.decoder.tok if engine.decoder is not None else None
            events: list[Any] = []

            def emit(e: Any, seen: list[int] = seen, tok: Any = tok, events: list[Any] = events,
                     uses: list[float] = uses, engine: Coordinator = engine) -> None:
                events.append(e)
                if tok is not None and e.token_id is not None:
                    seen.append(int(tok))  # the decoder's input buffer when this token is emitted
                    uses.append(engine.runner.stats()["expert_uses"])  # experts looked up so far

            engine.run(GenerateParams(prompt_token_ids=tuple(prompt), max_new_tokens=NEW_TOKENS), prompt, emit)
            assert [e.token_id for e in events[:-1]] == expected
            inputs[pipeline], looked_up[pipeline] = seen, uses
            engine.eos = {expected[3]}  # a stop token: the 4th output (its first occurrence)
            stop = engine.generate(GenerateParams(prompt_token_ids=tuple(prompt), max_new_tokens=NEW_TOKENS))
            first = expected.index(expected[3])
            assert [e.token_id for e in stop[:-1]] == expected[:first + 1] and stop[-1].finish_reason == "stop"
            if engine.decoder is not None:
                lengths[pipeline] = engine.decoder.length  # positions the decoder filled for that request
        finally:
            engine.close()
    if decode == "static":
        assert inputs[True][:-1] == expected[:-1]  # step t+1 already has token t (the last one has no step)
        assert inputs[False][1:] == expected[:-1]  # token t-1, the input of the step that made token t
        assert lengths[True] == lengths[False] + 1  # the step queued behind the stop token, discarded
        # emitted before step t+1 looked up any expert: only its first segments were queued
        assert looked_up[True] == looked_up[False]


def test_fused_sharded_checkpoint(tmp_path: Path) -> None:
    """transformers 5's fused expert layout (routers in mlp.gate) split over several safetensors files."""
    ckpt = build_tiny_random(tmp_path / "fused", TinySpec(fused_experts=True, max_shard_size="300KB", seed=3))
    assert (ckpt / "model.safetensors.index.json").is_file()
    stores = open_stores(ckpt, EXACT, 3, tmp_path / "experts")
    try:
        cfg = CoordinatorConfig(attn_bits=16, experts_per_layer=2, prefetch=1)
        assert_matches(ckpt, make_source(stores=stores), reference_model(ckpt), TINY_PROMPTS[:2], cfg)
    finally:
        for s in stores:
            s.close()


def test_quantized_matches_dequantized_reference(tiny_ckpt: Path, tmp_path: Path) -> None:
    """2-bit experts from the workers and 4-bit attention here equal transformers on hqq-dequantized weights."""
    stores = open_stores(tiny_ckpt, INT2, 2, tmp_path / "experts")
    try:
        source = make_source(stores=stores)
        reference = reference_model(tiny_ckpt, source, attn_bits=4)
        exact = reference_model(tiny_ckpt)
        differs = any(greedy(reference, p, NEW_TOKENS) != greedy(exact, p, NEW_TOKENS) for p in TINY_PROMPTS)
        assert differs, "quantization should change some tokens of a random model, or this test proves little"
        for bits, decode in ((4, "transformers"), (4, "static"), (8, "transformers")):
            ref = reference if bits == 4 else reference_model(tiny_ckpt, source, attn_bits=8)
            cfg = CoordinatorConfig(attn_bits=bits, experts_per_layer=3, prefetch=2, decode=decode)
            assert_matches(tiny_ckpt, source, ref, TINY_PROMPTS, cfg)
    finally:
        for s in stores:
            s.close()


def test_meta8_experts_match_their_dequantized_reference(tiny_ckpt: Path, tmp_path: Path) -> None:
    """3-bit experts whose scales and zeros are 8-bit table codes (``meta_bits`` 8): both decode paths give
    transformers' tokens on the weights the tables give (the CPU path decodes them; the GPU kernels read them,
    tests/test_gpu_kernels.py). The tables are in effect: the experts' weights differ from fp16 meta's."""
    stores = open_stores(tiny_ckpt, INT3_M8, 2, tmp_path / "experts")
    fp16 = open_stores(tiny_ckpt, INT3, 1, tmp_path / "experts16")[0]
    try:
        source = make_source(stores=stores)
        key = ExpertKey(2, 5)
        assert source.manifest(key).version == 2 and source.manifest(key).matrices["w1"].meta_bits == 8
        a = expert_weights(source, key)["w1"].float()
        b = expert_weights(make_source(stores=[fp16]), key)["w1"].float()
        assert 0 < float((a - b).norm() / b.norm()) < 0.02
        reference = reference_model(tiny_ckpt, source, attn_bits=4)
        for decode in ("transformers", "static"):
            cfg = CoordinatorConfig(attn_bits=4, experts_per_layer=2, prefetch=2, decode=decode)
            assert_matches(tiny_ckpt, source, reference, TINY_PROMPTS, cfg)
    finally:
        for s in stores + [fp16]:
            s.close()


@pytest.mark.skipif(not (CODE_MOE / "config.json").is_file(), reason="code-moe-22m not present")
@pytest.mark.parametrize(("k", "prefetch", "decode"), [(1, 2, "static"), (8, 0, "transformers")])
def test_code_moe_exact(k: int, prefetch: int, decode: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Learned routing, float16 checkpoint, tied embeddings, real tokenizer."""
    stores = open_stores(CODE_MOE, EXACT, 2, tmp_path_factory.mktemp("code-moe"))
    try:
        tokenizer = load_tokenizer(CODE_MOE)
        prompts = [tokenizer(p)["input_ids"] for p in ("def fibonacci(n):\n", "import os\nimport sys\n\nclass ")]
        cfg = CoordinatorConfig(attn_bits=16, experts_per_layer=k, prefetch=prefetch, decode=decode)
        assert_matches(CODE_MOE, make_source(stores=stores), reference_model(CODE_MOE), prompts, cfg)
    finally:
        for s in stores:
            s.close()


def test_static_decoder_holds_its_request(tiny_ckpt: Path, tiny_exact: ExpertSource) -> None:
    """The static decoder takes a request's K/V over at its first single-token step; a second request gets
    the decoder afterwards (same logits as alone), the first may not go back to multi-token steps; graphs need
    CUDA."""
    with pytest.raises(ValueError, match="graphs"):
        Coordinator(tiny_ckpt, tiny_exact, CoordinatorConfig(attn_bits=16, decode="graphs"))
    engine = Coordinator(tiny_ckpt, tiny_exact, CoordinatorConfig(attn_bits=16, decode="static"))
    plain = Coordinator(tiny_ckpt, tiny_exact, CoordinatorConfig(attn_bits=16, decode="transformers"))
    try:
        with torch.inference_mode():
            a, b, ref = engine.new_kv_cache(), engine.new_kv_cache(), plain.new_kv_cache()
            engine.step([5, 9, 33], a)
            engine.step([7], a)
            engine.step([1, 2], b)
            plain.step([1, 2], ref)
            assert torch.allclose(engine.step([3], b), plain.step([3], ref), atol=1e-5)
            with pytest.raises(RuntimeError, match="held by the static decoder"):
                engine.step([4, 5], b)
    finally:
        engine.close()
        plain.close()


@pytest.mark.parametrize("ahead", [1, 2])
def test_graph_host_steps_keep_the_device_rows_table(tiny_ckpt: Path, tiny_exact: ExpertSource, ahead: int) -> None:
    """What the host does between two graph replays, run on CPU: after each layer's routed experts are made
    resident, ``decoder.rows`` (what the next segment gathers its arena rows from) names the row each routed
    expert sits in, through misses, evictions (k = 2 of 8), misses admission keeps in spares and guesses one
    or two layers ahead, and every buffer keeps one owner."""
    import random

    engine = Coordinator(tiny_ckpt, tiny_exact, CoordinatorConfig(attn_bits=16, experts_per_layer=2, prefetch=1,
                                                                  decode="static", prefetch_ahead=ahead))
    decoder, runner, rng = engine.decoder, engine.runner, random.Random(0)
    assert decoder is not None
    try:
        for _ in range(40):
            runner.begin_step()
            for layer in range(decoder.L):
                routed = rng.sample(range(8), 2)
                decoder.route_host[layer, :2] = torch.tensor(routed)
                decoder.route_host[layer, 2:] = torch.tensor(rng.sample(range(8), decoder.P + decoder.P2))
                runner.after_compute(decoder._before_segment(layer + 1)[0])
                rows = decoder.rows[layer][routed].tolist()  # in the LRU, or (not admitted) in a spare
                assert [engine.cache.holder(r) for r in rows] == [ExpertKey(layer, e) for e in routed]
                decoder._predict(layer + 1)
            runner.settle()
            engine.cache.check()
        stats = runner.stats()
        assert stats["cache_misses"] > 0 and stats["prefetch_issued"] > 0 and stats["cache_not_admitted"] > 0
    finally:
        engine.close()


def test_quantized_lm_head_matches_its_reference_and_frees_memory(tiny_ckpt: Path, tmp_path: Path) -> None:
    """``lm_head_bits`` 4: transformers' tokens on the hqq-dequantized lm_head (both decode paths) and fewer
    device bytes for the shell; an lm_head that does not pack, or one tied to the embedding table (it would be
    held twice), is refused with a clear error."""
    from coordinator.model import ShellSpec, build_shell, non_expert_bytes

    ckpt = build_tiny_random(tmp_path / "even", TinySpec(layers=2, vocab=320))  # 259 tokens do not pack at 4 bits
    reference, exact = reference_model(ckpt, lm_head_bits=4), reference_model(ckpt)
    assert any(greedy(reference, p, NEW_TOKENS) != greedy(exact, p, NEW_TOKENS) for p in TINY_PROMPTS), \
        "a 4-bit lm_head should change some tokens of a random model, or this test proves little"
    stores = open_stores(ckpt, EXACT, 2, tmp_path / "experts")
    try:
        for decode in ("transformers", "static"):
            cfg = CoordinatorConfig(attn_bits=16, lm_head_bits=4, experts_per_layer=3, prefetch=2, decode=decode)
            assert_matches(ckpt, make_source(stores=stores), reference, TINY_PROMPTS, cfg)
        engines = [Coordinator(ckpt, make_source(stores=stores), cfg.with_(lm_head_bits=b)) for b in (4, 16)]
        # on the CPU lm_head stays hqq's HQQLinear, whose forward dequantizes it whole: the reserve holds that
        reserve = [e._workspace_bytes(torch.float32, e.runner.manifests) for e in engines]
        assert reserve[0] - reserve[1] == 320 * 64 * 4
        for e in engines:
            e.close()
    finally:
        for s in stores:
            s.close()
    full = non_expert_bytes(build_shell(ckpt, ShellSpec("cpu", 16, 64)))
    packed = non_expert_bytes(build_shell(ckpt, ShellSpec("cpu", 16, 64, lm_head_bits=4)))
    vocab, hidden = exact.lm_head.weight.shape
    assert full - packed > vocab * hidden * 4 * 0.8  # float32 on CPU: ~28 of 32 bits a weight freed
    with pytest.raises(ValueError, match="odd vocabulary"):
        build_shell(tiny_ckpt, ShellSpec("cpu", 16, 64, lm_head_bits=4))  # 259 tokens
    tied = Path(shutil.copytree(ckpt, tmp_path / "tied"))
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        build_shell(tied, ShellSpec("cpu", 16, 64, lm_head_bits=4))
