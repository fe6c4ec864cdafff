"""8-bit scale/zero tables (``QuantSpec.meta_bits`` 8): one matrix's hqq scales or zeros as a table of
LUT_ENTRIES values followed by one uint8 code a group. ``expert_workers.format`` stores them as the "scale" and
"zero" tensors; the kernels read ``table[code]`` (``coordinator.gemv_steps.group_meta``)."""

from __future__ import annotations

import torch

META8_TABLE = "even+tails"
"""Names how ``encode_meta8`` builds its tables: part of the on-disk cache key, so a new encoder quantizes again."""
LUT_ENTRIES = 256
"""Values in an 8-bit meta table (``coordinator.gemv_steps.TABLE``: the kernels find the codes this many values
on)."""


def encode_meta8(values: torch.Tensor, dtype: torch.dtype, log: bool) -> torch.Tensor:
    """``values`` (one matrix's scales or zeros) as one uint8 tensor: a table of LUT_ENTRIES ``dtype`` values,
    then one code a value, its nearest table entry. The kernels read a group's scale as ``table[code]``: one
    more load, from a 512-byte table that stays in L1. Scales are tabled in the log domain (their error counts
    relative to their size; they must be positive). Of the tables ``_table_points`` offers, the one whose worst
    value is off least wins. (A k-means table halves the typical error but left outlier groups 80% off.)"""
    x = values.reshape(-1).float()
    if log:
        if not bool(((x > 0) & x.isfinite()).all()):
            raise ValueError("an 8-bit scale table needs positive, finite scales")
        x = x.log()
    elif not bool(x.isfinite().all()):
        raise ValueError("an 8-bit zero table needs finite zeros")
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for points in _table_points(x):
        table = (points.exp() if log else points).to(dtype)   # what dequantization reads, rounded once
        t = table.float().log() if log else table.float()
        codes = torch.bucketize(x, (t[1:] + t[:-1]) / 2)
        worst = float((t[codes] - x).abs().max())
        if best is None or worst < best[0]:
            best = (worst, table, codes)
    assert best is not None
    return torch.cat([best[1].view(torch.uint8), best[2].to(torch.uint8)])


TAIL_ENTRIES = (8, 32)
"""Table entries for each tail in ``_table_points``' tables with tails."""
TAIL_QUANTILE = 0.001
"""Values beyond this quantile (and 1 − it) are a table's tails."""


def _table_points(x: torch.Tensor) -> list[torch.Tensor]:
    """Candidate tables of LUT_ENTRIES points for ``x``. First [min, max] evenly: nothing off by more than
    (max − min)/510. When values beyond the TAIL_QUANTILE quantiles stretch the range past twice the central
    one (a group all of one sign gets an hqq zero far outside [0, 2^bits − 1]), also tables that span the
    central range evenly and give each tail TAIL_ENTRIES points from its end: a few outliers then cost only
    themselves (the extremes stay exact); a heavy tail is better served by the even table. On code-moe-22m's
    trained experts the whole range is at most 1.32× the central one."""
    xs = x.sort().values
    n = xs.numel()
    lo, hi = xs[0].item(), xs[-1].item()
    qlo, qhi = xs[int(TAIL_QUANTILE * (n - 1))].item(), xs[int((1 - TAIL_QUANTILE) * (n - 1))].item()
    out = [torch.linspace(lo, hi, LUT_ENTRIES, device=x.device)]  # on the quantizing device (a GPU too)
    if hi - lo > 2 * (qhi - qlo):
        for tail in TAIL_ENTRIES:
            mid = torch.linspace(qlo, qhi, LUT_ENTRIES - 2 * tail, device=x.device)
            low = torch.linspace(lo, qlo, tail + 1, device=x.device)[:-1]
            high = torch.linspace(qhi, hi, tail + 1, device=x.device)[1:]
            out.append(torch.cat([low, mid, high]))
    return out


def decode_meta8(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [groups, 1] values ``encode_meta8`` stored (any device)."""
    nb = LUT_ENTRIES * dtype.itemsize
    return packed[:nb].view(dtype)[packed[nb:].long()].unsqueeze(1)
