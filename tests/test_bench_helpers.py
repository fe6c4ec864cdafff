"""The GPU benchmark's helpers: its arguments and its derived numbers (the benchmark runs on the GPU)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report
from bench.system_bench import prefetch_settings
from coordinator.__main__ import parse_args


def test_sys_prefetch_items_become_coordinator_flags() -> None:
    """Each (d) row's flags parse as the coordinator's own: prefetch, the layers guessed ahead, speculation."""
    settings = prefetch_settings("2,2n,0,2:2")
    assert [name for name, _ in settings] == ["_prefetch2", "_prefetch2_nospec", "_prefetch0", "_prefetch2_ahead2"]
    parsed = [parse_args(["serve", "--model", "m", "--workers", "127.0.0.1:1", *flags]) for _, flags in settings]
    assert [(a.prefetch, a.prefetch_ahead, a.no_speculate) for a in parsed] == [
        (2, 1, False), (2, 1, True), (0, 1, False), (2, 2, False)]


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
