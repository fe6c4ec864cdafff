"""The GPU benchmark's system rows, run here: ``bench.mixtral_bench --shape tiny`` on the CPU with real expert
worker and coordinator processes on 127.0.0.1, the path a GPU session runs at Mixtral's size.

A broken bench costs a scarce GPU session, so its plumbing is checked before one: the (c), (d) and (e) rows are
written with their counters, and a cap with no room for the slots becomes a failed row instead of ending the
table. No timings are checked (bench/ measures them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

ROOMY, TIGHT, NONE = 0.05, 0.01235, 0.002
"""Caps (GB) at --shape tiny: every expert fits; 5 slots for 8 experts (the cache misses); no room at all. The
coordinator holds 4 slots (its minimum: one a layer and 2 spares) at 0.0122 and all 8 from 0.0125 on: if what
it reserves besides the slots changes, TIGHT moves (the bench prints each cap's k)."""


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "bench.mixtral_bench", "--shape", "tiny", "--variants", "", "--caps3", "",
           "--caps", f"{TIGHT},{ROOMY},{NONE}", "--new-tokens", "6", "--grpc-tokens", "3", "--warmup", "1",
           "--sys-requests", "2", "--out", str(out / "results"), "--tag", "t", "--work", str(out / "work")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}  # the interpreter: no GPU here
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    found = json.loads(next((out / "results").glob("*-t.json")).read_text())
    found["markdown"] = next((out / "results").glob("*-t.md")).read_text()
    return found


def _row(results: dict, variant: str, cap: float) -> dict:  # type: ignore[type-arg]
    return next(r for r in results["runs"] if r["variant"] == variant and r["cap_gb"] == cap)


@pytest.mark.slow
def test_system_rows_count_what_the_cache_did(results: dict) -> None:  # type: ignore[type-arg]
    """(d) at both caps, (e) at the first, (c) at both: counted tokens, uses split into hits and misses, a
    tight cap missing where a roomy one does not, and (d)/(e) summing their two timed requests."""
    for variant, caps in (("d_workers_shm_zero_copy", (TIGHT, ROOMY)), ("e_workers_grpc_stream", (TIGHT,)),
                          ("c_offloading_eager", (TIGHT, ROOMY))):
        for cap in caps:
            row = _row(results, variant, cap)
            assert "skipped" not in row, row
            assert row["cache_hits"] + row["cache_misses"] == row["expert_uses"] > 0, row
            assert row["hit_rate"] == pytest.approx(row["cache_hits"] / row["expert_uses"])
            assert row["tokens_per_s"] > 0 and row["bytes_per_token"] >= 0
    tight, roomy = _row(results, "d_workers_shm_zero_copy", TIGHT), _row(results, "d_workers_shm_zero_copy", ROOMY)
    assert tight["k"] < roomy["k"] and tight["bytes_fetched"] > 0 and tight["hit_rate"] < 1.0
    assert tight["tokens"] == 2 * 6 and tight["request_stats"]["requests"] == 2  # 2 requests of 6 + 1 tokens
    assert _row(results, "e_workers_grpc_stream", TIGHT)["tokens"] == 2 * 3
    assert 0.0 <= tight["prefetch_recall"] <= 1.0
    assert "| d_workers_shm_zero_copy | 2 |" in results["markdown"]


@pytest.mark.slow
def test_a_cap_without_room_is_a_failed_row_not_the_end(results: dict) -> None:  # type: ignore[type-arg]
    """The last cap leaves no room for one expert a layer: (c) and (d) there are rows that say so (one line,
    for the markdown table), and the rows before them were kept."""
    for variant in ("c_offloading_eager", "d_workers_shm_zero_copy"):
        reason = _row(results, variant, NONE)["skipped"]
        assert "no room for one expert per layer" in reason and "\n" not in reason, reason
