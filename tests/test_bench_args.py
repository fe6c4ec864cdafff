"""The GPU benchmark's argument helpers (the benchmark itself runs on the lent GPU, not here)."""

from __future__ import annotations

from bench.system_bench import prefetch_settings
from coordinator.__main__ import parse_args


def test_sys_prefetch_items_become_coordinator_flags() -> None:
    """Each (d) row's flags parse as the coordinator's own: prefetch, the layers guessed ahead, speculation."""
    settings = prefetch_settings("2,2n,0,2:2")
    assert [name for name, _ in settings] == ["_prefetch2", "_prefetch2_nospec", "_prefetch0", "_prefetch2_ahead2"]
    parsed = [parse_args(["serve", "--model", "m", "--workers", "127.0.0.1:1", *flags]) for _, flags in settings]
    assert [(a.prefetch, a.prefetch_ahead, a.no_speculate) for a in parsed] == [
        (2, 1, False), (2, 1, True), (0, 1, False), (2, 2, False)]
