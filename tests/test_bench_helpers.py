"""The GPU benchmark's helpers: its arguments and its derived numbers (the benchmark runs on the GPU)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from bench import report
from bench.system_bench import prefetch_settings
from coordinator.__main__ import parse_args


def test_sys_prefetch_items_become_coordinator_flags() -> None:
    """Each (d) row's flags parse as the coordinator's own: prefetch, the layers guessed ahead, speculation,
    pipelining."""
    settings = prefetch_settings("2,2n,0,2:2,2p,1np,2fl,2a,2h,2s")
    assert [name for name, _ in settings] == ["_prefetch2", "_prefetch2_nospec", "_prefetch0", "_prefetch2_ahead2",
                                              "_prefetch2_nopipe", "_prefetch1_nospec_nopipe",
                                              "_prefetch2_fixedslots_lru", "_prefetch2_no_admission",
                                              "_prefetch2_lm_head4", "_prefetch2_slack160"]
    parsed = [parse_args(["serve", "--model", "m", "--workers", "127.0.0.1:1", *flags]) for _, flags in settings]
    assert [(a.prefetch, a.prefetch_ahead, a.no_speculate, a.no_pipeline, a.repartition_every, a.eviction,
             a.admission, a.lm_head_bits) for a in parsed] == [
        (2, 1, False, False, 32, "lrfu", True, 16), (2, 1, True, False, 32, "lrfu", True, 16),
        (0, 1, False, False, 32, "lrfu", True, 16), (2, 2, False, False, 32, "lrfu", True, 16),
        (2, 1, False, True, 32, "lrfu", True, 16), (1, 1, True, True, 32, "lrfu", True, 16),
        (2, 1, False, False, 0, "lru", True, 16), (2, 1, False, False, 32, "lrfu", False, 16),
        (2, 1, False, False, 32, "lrfu", True, 4), (2, 1, False, False, 32, "lrfu", True, 16)]
    assert [a.allocator_slack_mib for a in parsed] == [256] * 9 + [160]


def test_new_coordinator_flags_reach_the_config() -> None:
    """The coordinator's --prefill-chunk, --no-host-embeddings, --no-admission, --lm-head-bits and
    --allocator-slack-mib land in CoordinatorConfig (defaults 512, on, on, 16, 256)."""
    from coordinator.__main__ import engine_config

    base = ["serve", "--model", "m", "--workers", "127.0.0.1:1"]
    default = engine_config(parse_args(base))
    assert default.prefill_chunk == 512 and default.host_embeddings and default.admission
    assert default.lm_head_bits == 16 and default.allocator_slack_mib == 256
    changed = engine_config(parse_args([*base, "--prefill-chunk", "64", "--no-host-embeddings", "--no-admission",
                                        "--lm-head-bits", "4", "--allocator-slack-mib", "160"]))
    assert changed.prefill_chunk == 64 and not changed.host_embeddings and not changed.admission
    assert changed.lm_head_bits == 4 and changed.allocator_slack_mib == 160
    with pytest.raises(SystemExit):
        parse_args([*base, "--prefill-chunk", "0"])
    with pytest.raises(ValueError, match="allocator_slack_mib"):
        engine_config(parse_args([*base, "--allocator-slack-mib", "-1"]))


def _row(variant: str, ms: float, cap: float | None = None, hit: float = 1.0, mb: float = 0.0) -> dict[str, Any]:
    return {"variant": variant, "bits": 2, "cap_gb": cap, "k": 2, "tokens": 10, "ms_per_token": ms,
            "tokens_per_s": 1e3 / ms, "expert_uses": 640, "hit_rate": hit, "expert_bytes": 50e6,
            "bytes_per_token": mb * 1e6, "token_ids": [], "vram_peak_bytes": 6e9}


def test_report_floors_and_ratios() -> None:
    """The issue's floor counts only misses (a prefetched expert is free); the bytes floor counts every byte
    moved. (a) 10 ms, 50 GB/s, 64 uses a token: hit 0.75 -> 16 misses = 800 MB = 16 ms; 1500 MB moved = 30 ms."""
    runs = [_row("a_resident", 10.0), _row("b_naive_pageable", 400.0), _row("c_offloading_eager", 60.0, 8.0),
            _row("d_workers_shm_zero_copy", 35.0, 8.0, hit=0.75, mb=1500.0)]
    results = {"runs": runs, "bandwidth": {"h2d_pinned_GBps": 50.0}}
    report.finish(results)
    d = runs[-1]
    assert d["floor_ms"] == pytest.approx(26.0) and d["floor_bytes_ms"] == pytest.approx(40.0)
    (q,) = results["ratios"]
    assert q["x_over_floor"] == pytest.approx(26 / 35) and q["x_over_bytes_floor"] == pytest.approx(40 / 35)
    assert q["x_over_b"] == pytest.approx(400 / 35) and q["x_over_c"] == pytest.approx(60 / 35)
    assert q["vram_ok"] and "x/bytes floor" in report.table(results)


def test_merge_selects_rows_by_variant_cap_and_bits(tmp_path: Any) -> None:
    """``TAG=FILE:PREFIX@CAP#BITS`` keeps only the rows it names; the merged table gets the first file's bandwidth."""
    import json

    from bench.merge_results import merge

    two = [_row("a_resident", 10.0), _row("d_workers_shm_zero_copy", 20.0, 8.0, hit=0.9)]
    three = [{**r, "bits": 3} for r in (_row("a_resident", 30.0), _row("d_workers_shm_zero_copy", 50.0, 12.0),
                                         _row("d_workers_shm_zero_copy", 60.0, 8.0))]
    files = []
    for name, rows in (("x", two), ("y", two + three)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"env": {"date": name}, "bandwidth": {"h2d_pinned_GBps": 50.0}, "runs": rows}))
        files.append(path)
    merged = merge(str(tmp_path / "m"), [f"x={files[0]}", f"y={files[1]}:#3", f"z={files[1]}:d_@12#3"])
    kept = [(r["run"], r["variant"], r["bits"], r["cap_gb"]) for r in merged["runs"]]
    assert kept == [("x", "a_resident", 2, None), ("x", "d_workers_shm_zero_copy", 2, 8.0),
                    ("y", "a_resident", 3, None), ("y", "d_workers_shm_zero_copy", 3, 12.0),
                    ("y", "d_workers_shm_zero_copy", 3, 8.0), ("z", "d_workers_shm_zero_copy", 3, 12.0)]
    assert merged["env"]["date"] == "x" and (tmp_path / "m.md").is_file()


def test_timeline_splits_the_window_into_compute_copy_and_idle() -> None:
    """Two tokens: kernels 0-4 and 10-12 µs·1e3, expert copies 3-8 (and a small table copy that is not one)."""
    from bench.timeline import breakdown, device_trace

    ms = 1000.0
    ev = [{"ph": "X", "cat": "kernel", "name": "k", "ts": 0.0, "dur": 4 * ms},
          {"ph": "X", "cat": "kernel", "name": "k", "ts": 1 * ms, "dur": 1 * ms},   # overlaps the first
          {"ph": "X", "cat": "kernel", "name": "k", "ts": 10 * ms, "dur": 2 * ms},
          {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 3 * ms, "dur": 5 * ms,
           "args": {"bytes": 50_000_000}},
          {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 9 * ms, "dur": 0.1,
           "args": {"bytes": 64}},
          {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 8 * ms, "dur": 0.5 * ms,
           "args": {"bytes": 50_000_000}},
          {"ph": "i", "cat": "cpu_op", "name": "marker", "ts": 0.0}]
    parts = breakdown(device_trace({"traceEvents": ev}), tokens=2)
    assert parts["wall_ms"] == 6.0            # 0..12 over 2 tokens
    assert parts["compute_ms"] == 3.0         # 4 + 2
    assert parts["copy_ms"] == 2.5            # one expert copy of 5
    assert parts["both_ms"] == 0.5            # 3..4
    assert parts["compute_only_ms"] == 2.5 and parts["copy_only_ms"] == 2.0
    assert parts["idle_ms"] == 1.0            # 8..10
    assert parts["copies_per_token"] == 0.5
    assert abs(parts["copy_gb_s"] - 10.0) < 1e-9  # 50 MB in 5 ms


def test_belady_beats_lru_and_the_budget_goes_where_it_saves_most() -> None:
    """bench.cache_bound's policies on a trace worked by hand (3 slots, top-2 per step): LRU evicts expert 1
    at step 2 and loads it again at step 3; MIN evicts 2, used later. DP spreads 6 slots over two layers."""
    import numpy as np

    from bench.cache_bound import belady_misses, best_spread, coordinator_misses, lru_misses

    steps = np.array([[0, 1], [0, 2], [0, 3], [0, 1], [0, 2]])
    assert lru_misses(steps, 3) == 6
    assert belady_misses(steps, 3) == 5
    assert belady_misses(steps, 4) == lru_misses(steps, 4) == 4      # room for all: only the first loads
    assert lru_misses(steps, 3, skip=3) == 2 and belady_misses(steps, 3, skip=3) == 1   # steps 3 and 4 only
    assert best_spread([[0, 0, 5, 3, 1], [0, 0, 4, 4, 4]], 6, 2) == (5, [4, 2])
    # the coordinator's own ExpertCache, one layer, never re-planned: the same loads as the reference LRU
    assert coordinator_misses(steps[:, None, :], 3, 0, "lru", every=1000) == 6


def test_guess_recall_scores_the_guess_made_d_layers_before() -> None:
    """bench.cache_bound.guess_recall on a hand-made trace: 3 layers, 2 positions, top-2 routing; the guesses
    for layer l come from layer l − d."""
    import numpy as np

    from bench.cache_bound import guess_recall

    trace = np.array([[[0, 1], [2, 3], [4, 5]],
                      [[0, 1], [2, 4], [6, 7]]])                     # [T=2, L=3, k=2]
    ranked = np.zeros((2, 3, 2, 8), dtype=np.int64)                  # [T, L, reach=2, E]
    ranked[:, 0, 0, :3] = [[2, 5, 3], [4, 0, 1]]                     # layer 0 guessing layer 1
    ranked[:, 1, 0, :3] = [[4, 5, 0], [6, 1, 2]]                     # layer 1 guessing layer 2
    ranked[:, 0, 1, :3] = [[5, 0, 1], [0, 1, 7]]                     # layer 0 guessing layer 2
    # d = 1, top 2: layer 1 finds 2 (t0) and 4 (t1), layer 2 finds 4, 5 (t0) and 6 (t1): 5 of 8
    assert guess_recall(trace, ranked, 1, 2) == 5 / 8
    assert guess_recall(trace, ranked, 1, 3) == 6 / 8                # + 3 at t0 in layer 1
    assert guess_recall(trace, ranked, 2, 2) == 1 / 4                # layer 2 only: 5 at t0
    assert guess_recall(trace, ranked, 1, 2, skip=1) == 2 / 4        # t1 only: 4, then 6


def test_far_guess_engine_serves_the_most_urgent_load_a_block_at_a_time() -> None:
    """bench.far_guess's copy engine: a far guess in flight yields to a demand miss at the next block, and
    the replay's loads and time add up on a one-layer trace that always hits."""
    import numpy as np

    from bench.far_guess import Engine, Load, replay

    engine = Engine(tau=1.0, blocks=4)
    far = Load(layer=3, expert=0, urgency=2, left=1.0)
    engine.pending.append(far)
    engine.run_until(0.5)                          # two blocks of the far copy
    demand = Load(layer=1, expert=1, urgency=0, left=1.0)
    engine.pending.append(demand)
    assert engine.finish([demand]) == 1.5 and far.done_at is None and far.left == 0.5
    assert engine.drain() == 2.0 and far.done_at == 2.0 and engine.busy == 2.0
    trace = np.array([[[0, 1]]] * 6)               # [T=6, L=1, k=2]: experts 0 and 1 every step
    ranked = np.zeros((6, 1, 1, 8), dtype=np.int64)
    r = replay(trace, ranked, total=2, reach=1, top=2, c=0.25, tau=1.0, skip=2)
    assert r["loads_per_token"] == 0 and r["ms_per_token"] == 0.25 and r["copy_busy"] == 0
    r = replay(trace, ranked, total=2, reach=1, top=2, c=0.25, tau=1.0, skip=0)
    assert r["loads_per_token"] == 2 / 6 and r["ms_per_token"] == (2.0 + 6 * 0.25) / 6   # two cold misses


def test_far_guess_takes_a_guess_count_per_distance() -> None:
    """``replay(top=(2, 0))`` guesses two experts one layer ahead and none two ahead: the same loads and time as
    reach 1, top 2; guessing two ahead as well, on routing the guesses miss, loads more."""
    from bench.far_guess import replay

    rng = np.random.default_rng(0)
    trace = np.stack([rng.permutation(8)[:2] for _ in range(40 * 4)]).reshape(40, 4, 2)   # [T, L, k]
    ranked = np.stack([rng.permutation(8) for _ in range(40 * 4 * 2)]).reshape(40, 4, 2, 8)   # [T, L, reach, E]
    args = dict(total=12, c=0.25, tau=1.0, skip=4)
    near = replay(trace, ranked, reach=1, top=2, **args)
    assert replay(trace, ranked, reach=2, top=(2, 0), **args) == near
    assert replay(trace, ranked, reach=2, top=(2, 2), **args)["loads_per_token"] > near["loads_per_token"]


@pytest.mark.parametrize("bits", [2, 3])
def test_code_entropy_reads_hqqs_own_codes(bits: int) -> None:
    """``bench.code_entropy.codes`` recomputes hqq's codes from its scale and zero: they must equal the W_q hqq
    packs, or the entropy it reports (NOTES item 89) is of something else."""
    from hqq.core.quantize import Quantizer

    from bench.code_entropy import codes, entropy

    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w_q, meta = Quantizer.quantize(w, nbits=bits, group_size=64, axis=1, optimize=True, device="cpu")
    unpacked = Quantizer.unpack[meta["packing"]](w_q, dtype=torch.uint8).flatten()[:w.numel()]
    assert np.array_equal(codes(w, bits), unpacked.numpy().astype(np.int64))
    freq, h = entropy(codes(w, bits), 2**bits)
    assert abs(freq.sum() - 1) < 1e-9 and 0.7 * bits < h < bits   # the middle levels dominate
