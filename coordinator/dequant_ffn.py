"""Expert FFNs for prefill-sized batches and layouts the GEMV kernels do not read: each weight matrix is
dequantized on the GPU (``gpu_kernels.dequantize``, ``planes3.dequantize``) a block of rows at a time into one
of two small reused buffers, then multiplied by cuBLAS; on the CPU, and for 16-bit experts, whole matrices
through hqq's dequantize (or views) + matmul.

Shape legend (as ``gpu_kernels``): x [M, H]; w1, w3 [I, H]; w2 [H, I]; y [M, H].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coordinator import gpu_kernels as gk
from coordinator import planes3
from expert_workers.format import PLANES3, ExpertManifest, dequantize_matrix, dtype_of
from expert_workers.meta8 import LUT_ENTRIES

_WORKSPACE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
DEQUANT_CHUNK = 1 << 23
"""Weights the prefill path dequantizes at once (two buffers of this many, 16 MiB each in bf16): a prefill
then needs ~32 MiB of workspace, not an expert's whole dequantized weights (352 MiB for Mixtral), and the
memory budget buys expert slots with the difference."""


def workspace_bytes(dtype: torch.dtype) -> int:
    """Device bytes the chunked dequantize + matmul path keeps (``expert_ffn_chunked``)."""
    return 2 * DEQUANT_CHUNK * dtype.itemsize


def _workspace(numel: int, device: torch.device, dtype: torch.dtype, slot: int) -> torch.Tensor:
    """Reused dequantization buffers (two per device/dtype) so the prefill path allocates no weights per call."""
    key = (device, dtype)
    ws = _WORKSPACE.get(key)
    if ws is None or ws.shape[1] < numel:
        ws = torch.empty((2, numel), device=device, dtype=dtype)
        _WORKSPACE[key] = ws
    return ws[slot, :numel]


def _shapes(lay: gk.PackedLayout) -> tuple[tuple[int, int], ...]:
    """[out, in] of w1, w3, w2."""
    return (lay.inter, lay.hidden), (lay.inter, lay.hidden), (lay.hidden, lay.inter)


def _dequant_rows(buf: torch.Tensor, lay: gk.PackedLayout, i: int, rows: tuple[int, int], slot: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Rows n0 ≤ n < n1 of matrix ``i`` (0 w1, 1 w3, 2 w2) of the packed expert ``buf``, dequantized by one
    Triton launch into workspace buffer ``slot``: [n1 − n0, in]."""
    s = _shapes(lay)[i]
    oq, os_, oz = lay.offsets[3 * i:3 * i + 3]
    wdt, qdt = dtype_of(lay.weight_dtype), dtype_of(lay.wq_dtype)
    ngroups = s[0] * s[1] // lay.group_size
    w_q = buf[oq:oq + lay.wq_rows[i] * lay.group_size * qdt.itemsize].view(qdt).view(-1, lay.group_size)
    # at 8 meta bits: the tables (the kernel reads the codes that follow them in the buffer)
    nmeta = LUT_ENTRIES if lay.meta8 else ngroups
    scale = buf[os_:os_ + wdt.itemsize * nmeta].view(wdt)
    zero = buf[oz:oz + wdt.itemsize * nmeta].view(wdt)
    numel = (rows[1] - rows[0]) * s[1]  # ≤ DEQUANT_CHUNK, or one row when a row alone is larger
    w = _workspace(max(DEQUANT_CHUNK, numel), buf.device, dtype, slot)[:numel].view(-1, s[1])
    if lay.packing == PLANES3:
        hi = buf[lay.hi_offsets[i]:lay.hi_offsets[i] + w_q.numel() // 2]
        return planes3.dequantize(w_q, hi, scale, zero, s, lay.group_size, w, rows, lay.meta8)
    return gk.dequantize(w_q, scale, zero, s, lay.bits, lay.group_size, lay.packing, dtype, w, rows, lay.meta8)


def row_blocks(n: int, k: int) -> list[tuple[int, int]]:
    """Row ranges of an [n, k] matrix of at most DEQUANT_CHUNK weights each."""
    step = max(1, DEQUANT_CHUNK // k)
    return [(n0, min(n, n0 + step)) for n0 in range(0, n, step)]


def expert_ffn_chunked(x: torch.Tensor, buf: torch.Tensor, lay: gk.PackedLayout) -> torch.Tensor:
    """y = w2 · (silu(w1 · x) * (w3 · x)) with the weights dequantized a block of rows at a time: h's columns
    come from row blocks of w1 and w3, y's from row blocks of w2, so the workspace holds two blocks of
    DEQUANT_CHUNK weights and never a whole expert. Each output is still one full-length dot product."""
    m, hidden, inter = x.shape[0], lay.hidden, lay.inter
    h = torch.empty((m, inter), device=x.device, dtype=x.dtype)
    for rows in row_blocks(inter, hidden):
        w1 = _dequant_rows(buf, lay, 0, rows, 0, x.dtype)
        w3 = _dequant_rows(buf, lay, 1, rows, 1, x.dtype)
        h[:, rows[0]:rows[1]] = F.silu(F.linear(x, w1)) * F.linear(x, w3)
    y = torch.empty((m, hidden), device=x.device, dtype=x.dtype)
    for rows in row_blocks(hidden, inter):
        y[:, rows[0]:rows[1]] = F.linear(h, _dequant_rows(buf, lay, 2, rows, 0, x.dtype))
    return y


def _weights_of(buf: torch.Tensor, manifest: ExpertManifest | gk.PackedLayout, lay: gk.PackedLayout,
                dtype: torch.dtype) -> list[torch.Tensor]:
    """w1, w3, w2 as whole [out, in] tensors in ``dtype`` (bits 16: views; CPU: hqq's dequantize)."""
    if lay.bits == 16:
        wdt, o = dtype_of(lay.weight_dtype), lay.offsets
        return [buf[o[i]:o[i] + s[0] * s[1] * wdt.itemsize].view(wdt).view(s).to(dtype)
                for i, s in enumerate(_shapes(lay))]
    if not isinstance(manifest, ExpertManifest):
        raise ValueError("the CPU path needs the ExpertManifest, not only its layout")
    return [dequantize_matrix(buf, manifest, name).to(dtype) for name in ("w1", "w3", "w2")]


def expert_ffn(x: torch.Tensor, buf: torch.Tensor, manifest: ExpertManifest | gk.PackedLayout,
               lay: gk.PackedLayout, out: torch.Tensor | None) -> torch.Tensor:
    """y = w2 · (silu(w1 · x) * (w3 · x)) for one packed expert ``buf``: row blocks on the GPU, whole matrices
    elsewhere (and for 16-bit experts); written into ``out`` when given."""
    if lay.bits != 16 and gk._triton_ok(buf):
        y = expert_ffn_chunked(x, buf, lay)
    else:
        w1, w3, w2 = _weights_of(buf, manifest, lay, x.dtype)
        y = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    return y if out is None else out.copy_(y)


def moe_ffn(x: torch.Tensor, slab: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
            lay: gk.PackedLayout, out: torch.Tensor | None) -> torch.Tensor:
    """Dequantize + cuBLAS per used slot (3-bit layouts, prefill-sized batches). Syncs on ``slots``."""
    y = torch.zeros_like(x) if out is None else out.zero_()
    flat = slots.reshape(-1).tolist()
    for s in sorted(set(flat)):
        sel = (slots == s)                              # [M, T]
        tok = sel.any(dim=1).nonzero().squeeze(1)
        wsel = (weights * sel).sum(dim=1)[tok].to(x.dtype)
        y.index_add_(0, tok, expert_ffn(x[tok], slab[s], lay, lay, None) * wsel[:, None])
    return y
