"""Fast GPU expert FFN read straight from the packed expert format (issue 6).

Shape legend

    x   [M, H]      activations of M tokens (decode: M = 1), fp16 or bf16
    w1  [I, H]      gate projection      w3 [I, H] up projection      w2 [H, I] down projection
    y   [M, H]      Σ_t weight[m, t] · w2 · (silu(w1 · x_m) * (w3 · x_m))   over the M·T (token, expert) pairs

hqq's axis=1 layout, as stored by ``expert_workers.format`` (no repacking anywhere): an [N, K] matrix is cut
into R = N·K/g groups of g weights along K (group row r = n·(K/g) + k//g). ``W_q`` packs V = 8/bits values per
byte ("2bit_u8", "4bit_u8", "8bit_u8"): byte (i, j) of the [R/V, g] tensor holds group rows i + v·R/V,
v = 0..V-1, most significant bits first. Since R/V = (N/V)·(K/g), ``W_q`` viewed as [N/V, K] holds in byte
(n', k) the weights W[n' + v·N/V, k]: one byte feeds V output rows at the same k, so a tile of BN packed rows
computes V·BN outputs and every byte is read once. ``scale``/``zero`` are [R] fp16 and W = (W_q − zero)·scale.
The K loop's steps (by bytes, or by int32 words: ``GemvConfig.words``) are in ``coordinator.gemv_steps``.

3-bit codes come as two planes, "2bit_u8" and "1bit_u8" of the same rows (``format.PLANES3``), read by the
kernels of ``coordinator.planes3`` the same way (one tile computes 8 rows per packed row).

Paths, fastest first:
1. Triton GEMV kernels (this module; ``planes3`` for 3 bits) for u8 packings (2, 3, 4, 8 bits) and M ≤
   ``GEMV_MAX_TOKENS``: one launch for w1+w3+silu·mul of all (token, expert) pairs, one for w2 + the
   routing-weighted sum. Slots can be read from a device tensor (``moe_ffn``), so a whole layer is
   graph-capturable.
2. A Triton dequantize kernel (any packing, this module), a block of rows at a time into a small reused
   workspace, + cuBLAS: for prefill-sized M (``coordinator.dequant_ffn``).
3. On CPU: hqq's own ``Quantizer.dequantize`` (``format.dequantize_matrix``) + matmul; bits 16: plain matmul
   (``coordinator.dequant_ffn`` too).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from expert_workers.format import PLANES3, ExpertManifest, dtype_of, tensor_views

try:  # Triton comes with gemlite on Linux; without it (or without CUDA) the torch path serves
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    HAVE_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # Triton's CPU interpreter (kernel tests on CI)
GEMV_MAX_TOKENS = 4
"""Above this many tokens per call, dequantize + cuBLAS beats re-reading the packed weights per token."""
_U8_PACKINGS = {"2bit_u8": 2, "4bit_u8": 4, "8bit_u8": 8}
_WORD_TOP = {"2bit_u8": 8, "4bit_u8": 8, "8bit_u8": 8, "3bit_32": 30, "1bit_u8": 8}


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of one GEMV kernel (tuned on the H200 by bench/kernel_bench.py)."""

    block_n: int = 16
    """Packed rows per program (each yields 8/bits output rows)."""
    groups_per_block: int = 2
    """Quantization groups per K step (K step = groups_per_block · group_size)."""
    split_k: int = 1
    """Programs sharing one row block along K (>1: fp32 atomics into a zeroed buffer)."""
    num_warps: int = 4
    """Warps per program."""
    num_stages: int = 3
    """Software-pipelining depth of the K loop."""
    words: bool = False
    """Read W_q as int32 words and turn each field into a float with one mask-or (``gemv_steps.wstep``)
    instead of unpacking bytes (``qstep``): fewer integer instructions per weight, the same products."""


# tuned on the H200 (bench/results/2026-12-01-h200-s8{a,b}.json, "sweep_ms"): 2 experts in 0.124 ms graphed by
# words, 0.19 ms by bytes (the session-1 shapes, kept in the sweep); 4-bit qkv 0.015 ms (bytes: 0.022)
GATE_UP = GemvConfig(block_n=8, groups_per_block=4, split_k=1, num_warps=4, num_stages=3, words=True)
DOWN = GemvConfig(block_n=8, groups_per_block=4, split_k=4, num_warps=4, num_stages=3, words=True)
LINEAR = GemvConfig(block_n=8, groups_per_block=8, split_k=1, num_warps=8, num_stages=3, words=True)
# 3-bit planes (s8b, "bits3"): 2 experts in 0.158 ms graphed by words, 0.22 ms by bytes
GATE_UP3 = GemvConfig(block_n=4, groups_per_block=8, split_k=1, num_warps=4, num_stages=3, words=True)
DOWN3 = GemvConfig(block_n=8, groups_per_block=4, split_k=4, num_warps=4, num_stages=3, words=True)
# 3-bit planes with 8-bit scale/zero tables (s16f, H100): 2 experts in 0.171 ms against 0.190 at GATE_UP3/DOWN3,
# whose gate-up tile the tables push into register spills (NOTES item 88)
GATE_UP3_M8 = GemvConfig(block_n=4, groups_per_block=4, split_k=1, num_warps=4, num_stages=3, words=True)
DOWN3_M8 = GemvConfig(block_n=8, groups_per_block=4, split_k=8, num_warps=4, num_stages=3, words=True)


def set_configs(gate_up: GemvConfig | None = None, down: GemvConfig | None = None,
                linear: GemvConfig | None = None, gate_up3: GemvConfig | None = None,
                down3: GemvConfig | None = None, meta8: bool = False) -> None:
    """Installs tuned launch shapes (bench/kernel_bench.py picks them on the target GPU); ``meta8``: the 3-bit
    ones go to layouts with 8-bit tables."""
    global GATE_UP, DOWN, LINEAR, GATE_UP3, DOWN3, GATE_UP3_M8, DOWN3_M8
    GATE_UP, DOWN, LINEAR = gate_up or GATE_UP, down or DOWN, linear or LINEAR
    if meta8:
        GATE_UP3_M8, DOWN3_M8 = gate_up3 or GATE_UP3_M8, down3 or DOWN3_M8
    else:
        GATE_UP3, DOWN3 = gate_up3 or GATE_UP3, down3 or DOWN3


def group_tiles(group: int) -> bool:
    """Whether a GEMV tile can span a quantization group of ``group`` weights: its group axis is a Triton
    range, so a power of two."""
    return group > 0 and group & (group - 1) == 0


@dataclass(frozen=True)
class PackedLayout:
    """Where w1/w3/w2 live inside one packed expert buffer; identical for every expert of a model, so one
    layout serves all cache slots (kernels add a slot's base address)."""

    hidden: int
    """H."""
    inter: int
    """I."""
    bits: int
    """Bits of all three matrices (16 = unquantized)."""
    group_size: int
    """hqq group size (0 at bits 16)."""
    packing: str
    """hqq packing name ("" at bits 16)."""
    offsets: tuple[int, ...]
    """Byte offsets: W_q, scale, zero of w1, w3, w2 (9), or weight of w1, w3, w2 (3) at bits 16."""
    weight_dtype: str
    """Dtype of scale/zero (or of the weights at bits 16)."""
    nbytes: int
    """Buffer length."""
    wq_rows: tuple[int, ...] = ()
    """Rows of each matrix's packed W_q ([rows, group_size]): the hqq packing step."""
    wq_dtype: str = "uint8"
    """Dtype of W_q ("uint8"; "int32" for hqq's own 3-bit packing, "3bit_32")."""
    hi_offsets: tuple[int, ...] = ()
    """Byte offsets of the high-bit planes (W_qh) of w1, w3, w2: PLANES3 only."""
    meta8: bool = False
    """Scales and zeros are 8-bit codes into a per-matrix table (``expert_workers.meta8``); ``weight_dtype`` is the
    table's dtype."""

    @classmethod
    def from_manifest(cls, m: ExpertManifest) -> PackedLayout:
        w1, w3, w2 = m.matrices["w1"], m.matrices["w3"], m.matrices["w2"]
        if not (w1.bits == w3.bits == w2.bits and w1.group_size == w3.group_size == w2.group_size
                and w1.shape == w3.shape and tuple(w2.shape) == tuple(w1.shape)[::-1]):
            raise ValueError(f"expert {m.key}: w1/w3/w2 must share bits, group size and transposed shapes")
        if not w1.meta_bits == w3.meta_bits == w2.meta_bits:
            raise ValueError(f"expert {m.key}: w1/w3/w2 must share meta bits")
        names = ("weight",) if w1.bits == 16 else ("W_q", "scale", "zero")
        offsets = tuple(mat.tensors[t].offset for mat in (w1, w3, w2) for t in names)
        meta8 = w1.bits != 16 and w1.meta_bits == 8
        wdt = w1.compute_dtype if meta8 else w1.tensors["weight" if w1.bits == 16 else "scale"].dtype
        wq = [mat.tensors["W_q"] for mat in (w1, w3, w2)] if w1.bits != 16 else []
        return cls(hidden=w1.shape[1], inter=w1.shape[0], bits=w1.bits, group_size=w1.group_size,
                   packing=w1.packing, offsets=offsets, weight_dtype=wdt, nbytes=m.nbytes,
                   wq_rows=tuple(e.nbytes // (w1.group_size * dtype_of(e.dtype).itemsize) for e in wq),
                   wq_dtype=wq[0].dtype if wq else "uint8",
                   hi_offsets=tuple(mat.tensors["W_qh"].offset for mat in (w1, w3, w2))
                   if w1.packing == PLANES3 else (), meta8=meta8)

    @property
    def vals(self) -> int:
        """Output rows one packed row feeds (8/bits for u8 packings, 8 for PLANES3; 0: no GEMV kernel)."""
        return 8 if self.packing == PLANES3 else 8 // self.bits if self.packing in _U8_PACKINGS else 0

    @property
    def fused(self) -> bool:
        """Whether the Triton GEMV kernels read this layout directly: whole groups along K, of a power-of-two
        size (a tile's group axis is a Triton range)."""
        vals, g = self.vals, self.group_size
        return (vals > 0 and self.hidden % vals == 0 and self.inter % vals == 0 and group_tiles(g)
                and self.hidden % g == 0 and self.inter % g == 0)


def configs_for(layout: PackedLayout) -> tuple[GemvConfig, GemvConfig]:
    """The (gate-up, down) launch shapes the GEMV kernels use for ``layout``."""
    if layout.packing == PLANES3:
        return (GATE_UP3_M8, DOWN3_M8) if layout.meta8 else (GATE_UP3, DOWN3)
    return GATE_UP, DOWN


# ----------------------------------------------------------------------------------------------- kernels
if HAVE_TRITON:
    from coordinator.gemv_steps import emit, group_meta, kstep, qstep, rowsum, wstep, x_tile, xw_tile, zeros4

    @triton.jit
    def _gate_up_kernel(x_ptr, base_ptr, slots_ptr, slot_stride, h_ptr, zero_ptr, zero_n,
                        OQ1: tl.constexpr, OS1: tl.constexpr, OZ1: tl.constexpr,
                        OQ3: tl.constexpr, OS3: tl.constexpr, OZ3: tl.constexpr,
                        H: tl.constexpr, I: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                        TOPK: tl.constexpr, INDIRECT: tl.constexpr, ZERO_OUT: tl.constexpr,
                        WDT: tl.constexpr, BN: tl.constexpr, GPB: tl.constexpr, WORDS: tl.constexpr,
                        META8: tl.constexpr):
        """h[p, :] = silu(w1 x) * (w3 x) for pair p = program_id(1) (token p // TOPK, slot slots[p])."""
        V: tl.constexpr = 8 // BITS
        NV: tl.constexpr = I // V
        pid_n = tl.program_id(0)
        pair = tl.program_id(1)
        if ZERO_OUT:  # clear the down kernel's split-K accumulator on the way (saves a launch)
            zi = (pair * tl.num_programs(0) + pid_n) * (BN * V) + tl.arange(0, BN * V)
            tl.store(zero_ptr + zi, tl.zeros([BN * V], tl.float32), mask=zi < zero_n)
        base = base_ptr
        if INDIRECT:
            base = base_ptr + tl.load(slots_ptr + pair).to(tl.int64) * slot_stride
        q1, s1, z1 = base + OQ1, (base + OS1).to(tl.pointer_type(WDT)), (base + OZ1).to(tl.pointer_type(WDT))
        q3, s3, z3 = base + OQ3, (base + OS3).to(tl.pointer_type(WDT)), (base + OZ3).to(tl.pointer_type(WDT))
        x_row = x_ptr + (pair // TOPK) * H
        rows = pid_n * BN + tl.arange(0, BN)
        row_mask = rows < NV
        GT: tl.constexpr = GROUP // 4 if WORDS else GROUP           # accumulator tile: words or bytes
        g0, g1, g2, g3 = zeros4(BN, GPB, GT, BITS)
        u0, u1, u2, u3 = zeros4(BN, GPB, GT, BITS)
        for kb in range(0, H // (GPB * GROUP)):
            if WORDS:
                xs0, xs1 = xw_tile(x_row, kb, 0, GROUP, GPB), xw_tile(x_row, kb, 1, GROUP, GPB)
                xs2, xs3 = xw_tile(x_row, kb, 2, GROUP, GPB), xw_tile(x_row, kb, 3, GROUP, GPB)
                g0, g1, g2, g3 = wstep(q1, s1, z1, xs0, xs1, xs2, xs3, rows, row_mask, kb, g0, g1, g2, g3,
                                       NV, H, GROUP, BITS, BN, GPB, META8)
                u0, u1, u2, u3 = wstep(q3, s3, z3, xs0, xs1, xs2, xs3, rows, row_mask, kb, u0, u1, u2, u3,
                                       NV, H, GROUP, BITS, BN, GPB, META8)
            else:
                x3 = x_tile(x_row, kb, GROUP, GPB)
                g0, g1, g2, g3 = qstep(q1, s1, z1, x3, rows, row_mask, kb, g0, g1, g2, g3, NV, H, GROUP, BITS,
                                       BN, GPB, META8)
                u0, u1, u2, u3 = qstep(q3, s3, z3, x3, rows, row_mask, kb, u0, u1, u2, u3, NV, H, GROUP, BITS,
                                       BN, GPB, META8)
        out = h_ptr + pair * I + rows
        a, b = rowsum(g0), rowsum(u0)
        tl.store(out, a / (1.0 + tl.exp(-a)) * b, mask=row_mask)
        if V >= 2:
            a, b = rowsum(g1), rowsum(u1)
            tl.store(out + NV, a / (1.0 + tl.exp(-a)) * b, mask=row_mask)
        if V >= 4:
            a, b = rowsum(g2), rowsum(u2)
            tl.store(out + 2 * NV, a / (1.0 + tl.exp(-a)) * b, mask=row_mask)
            a, b = rowsum(g3), rowsum(u3)
            tl.store(out + 3 * NV, a / (1.0 + tl.exp(-a)) * b, mask=row_mask)

    @triton.jit
    def _down_kernel(h_ptr, base_ptr, slots_ptr, slot_stride, w_ptr, y_ptr,
                     OQ: tl.constexpr, OS: tl.constexpr, OZ: tl.constexpr,
                     H: tl.constexpr, I: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                     TOPK: tl.constexpr, INDIRECT: tl.constexpr, SPLIT_K: tl.constexpr,
                     WDT: tl.constexpr, BN: tl.constexpr, GPB: tl.constexpr, WORDS: tl.constexpr,
                     META8: tl.constexpr):
        """y[m] (+)= Σ_t weight[m, t] · w2_slot(m,t) · h[m·TOPK + t]; program (rows, K split, token m)."""
        V: tl.constexpr = 8 // BITS
        NV: tl.constexpr = H // V
        NKB: tl.constexpr = I // (GPB * GROUP)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        rows = pid_n * BN + tl.arange(0, BN)
        row_mask = rows < NV
        o0 = tl.zeros([BN], tl.float32)
        o1 = tl.zeros([BN], tl.float32)
        o2 = tl.zeros([BN], tl.float32)
        o3 = tl.zeros([BN], tl.float32)
        for t in range(TOPK):
            pair = m * TOPK + t
            base = base_ptr
            wt = 1.0
            if INDIRECT:
                base = base_ptr + tl.load(slots_ptr + pair).to(tl.int64) * slot_stride
                wt = tl.load(w_ptr + pair).to(tl.float32)
            q, s, z = base + OQ, (base + OS).to(tl.pointer_type(WDT)), (base + OZ).to(tl.pointer_type(WDT))
            a0, a1, a2, a3 = zeros4(BN, GPB, GROUP // 4 if WORDS else GROUP, BITS)
            for kb in range(pid_k, NKB, SPLIT_K):
                a0, a1, a2, a3 = kstep(q, s, z, h_ptr + pair * I, rows, row_mask, kb, a0, a1, a2, a3,
                                       NV, I, GROUP, BITS, BN, GPB, WORDS, META8)
            o0 += wt * rowsum(a0)
            if V >= 2:
                o1 += wt * rowsum(a1)
            if V >= 4:
                o2 += wt * rowsum(a2)
                o3 += wt * rowsum(a3)
        out = y_ptr + m * H + rows
        emit(out, o0, row_mask, SPLIT_K)
        if V >= 2:
            emit(out + NV, o1, row_mask, SPLIT_K)
        if V >= 4:
            emit(out + 2 * NV, o2, row_mask, SPLIT_K)
            emit(out + 3 * NV, o3, row_mask, SPLIT_K)

    @triton.jit
    def _linear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, N: tl.constexpr, K: tl.constexpr,
                       GROUP: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr, GPB: tl.constexpr,
                       WORDS: tl.constexpr):
        """y[m] = W x[m] for one hqq-packed [N, K] matrix (attention projections)."""
        V: tl.constexpr = 8 // BITS
        NV: tl.constexpr = N // V
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        row_mask = rows < NV
        a0, a1, a2, a3 = zeros4(BN, GPB, GROUP // 4 if WORDS else GROUP, BITS)
        for kb in range(0, K // (GPB * GROUP)):
            a0, a1, a2, a3 = kstep(q_ptr, s_ptr, z_ptr, x_ptr + m * K, rows, row_mask, kb, a0, a1, a2, a3,
                                   NV, K, GROUP, BITS, BN, GPB, WORDS, False)
        out = y_ptr + m * N + rows
        emit(out, rowsum(a0), row_mask, 1)
        if V >= 2:
            emit(out + NV, rowsum(a1), row_mask, 1)
        if V >= 4:
            emit(out + 2 * NV, rowsum(a2), row_mask, 1)
            emit(out + 3 * NV, rowsum(a3), row_mask, 1)

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, z_ptr, w_ptr, first, total, step,
                        GROUP: tl.constexpr, BITS: tl.constexpr, TOP: tl.constexpr, BLOCK: tl.constexpr,
                        META8: tl.constexpr):
        """w[e − first] = (q(e) − zero[r]) · scale[r] for the elements first ≤ e < total of [N, K] (flat, so a
        range of whole rows); any hqq packing."""
        e = first + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: the caller checks N·K < 2**31
        mask = e < total
        r = e // GROUP
        i = r % step
        v = r // step
        word = tl.load(q_ptr + i * GROUP + e % GROUP, mask=mask, other=0).to(tl.int32)
        q = ((word >> (TOP - BITS * (v + 1)).to(tl.int32)) & ((1 << BITS) - 1)).to(tl.float32)
        s = group_meta(s_ptr, r, mask, META8)
        z = group_meta(z_ptr, r, mask, META8)
        tl.store(w_ptr + (e - first), ((q - z) * s).to(w_ptr.dtype.element_ty), mask=mask)


def _triton_ok(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t`` (CUDA, or any tensor under the interpreter)."""
    return HAVE_TRITON and (t.is_cuda or _INTERPRET)


def _tl_dtype(name: str) -> Any:
    return {"float16": tl.float16, "bfloat16": tl.bfloat16, "float32": tl.float32}[name]


def _words(cfg: GemvConfig, group: int) -> bool:
    """Whether to read W_q by int32 words: asked for, and a group holds a power of two ≥ 2 of words."""
    return cfg.words and group >= 8 and group_tiles(group)


def _fit(cfg: GemvConfig, k: int, group: int) -> GemvConfig:
    """``cfg`` with groups_per_block halved until a K step divides K (small test models); K must hold whole
    groups."""
    if k % group:
        raise ValueError(f"K={k} is not a multiple of the group size {group}")
    gpb = cfg.groups_per_block
    while (k // group) % gpb:
        gpb //= 2
    return cfg if gpb == cfg.groups_per_block else dataclasses.replace(cfg, groups_per_block=gpb)


# ------------------------------------------------------------------------------------------- public API
def moe_ffn(x: torch.Tensor, slab: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
            layout: PackedLayout, out: torch.Tensor | None = None,
            gate_up: GemvConfig | None = None, down: GemvConfig | None = None) -> torch.Tensor:
    """Routing-weighted sum of experts for M tokens, reading each expert from its cache slot.

    x [M, H] (cuda, fp16/bf16); slab: uint8 [S, stride] (a cache's slots, row s = slot s); slots: int32
    [M, T] device tensor of slot indices; weights: [M, T] routing weights. Nothing syncs with the host, so
    the call is CUDA-graph capturable with static slots/weights tensors. Needs ``layout.fused``."""
    m, t = slots.shape
    if not layout.fused or m > GEMV_MAX_TOKENS:
        from coordinator import dequant_ffn  # it builds on this module's kernels

        return dequant_ffn.moe_ffn(x, slab, slots, weights, layout, out)
    gu, dn = configs_for(layout)
    return _launch(x, slab, slab.stride(0), slots.reshape(-1), weights.reshape(-1).float(), t, True,
                   layout, out, gate_up or gu, down or dn)


def expert_ffn(x: torch.Tensor, buf: torch.Tensor, manifest: ExpertManifest | PackedLayout,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """y = w2 · (silu(w1 · x) * (w3 · x)) for one packed expert ``buf`` (uint8, any device); x [M, H]."""
    layout = manifest if isinstance(manifest, PackedLayout) else layout_of(manifest)
    if _triton_ok(x) and layout.fused and x.shape[0] <= GEMV_MAX_TOKENS:
        return _launch(x, buf, 0, buf, buf, 1, False, layout, out, *configs_for(layout))
    from coordinator import dequant_ffn  # it builds on this module's kernels

    return dequant_ffn.expert_ffn(x, buf, manifest, layout, out)


def expert_ffn_views(slot_views: Any, manifest: ExpertManifest, x: torch.Tensor) -> torch.Tensor:
    """``expert_ffn`` for a caller holding a cache slot's zero-copy views (coordinator.moe's signature): the
    slot's uint8 row is recovered from the w1 W_q view (same storage), nothing is copied."""
    lay = layout_of(manifest)
    first = slot_views["w1"]["weight" if lay.bits == 16 else "W_q"]
    row = torch.empty(0, dtype=torch.uint8, device=first.device)
    row.set_(first.untyped_storage(), first.storage_offset() * first.element_size() - lay.offsets[0], (lay.nbytes,))
    return expert_ffn(x, row, manifest)


def _launch(x: torch.Tensor, base: torch.Tensor, stride: int, slots: torch.Tensor, w: torch.Tensor,
            topk: int, indirect: bool, lay: PackedLayout, out: torch.Tensor | None,
            gu: GemvConfig, dn: GemvConfig) -> torch.Tensor:
    m = x.shape[0]
    hdim, idim, g, bits = lay.hidden, lay.inter, lay.group_size, lay.bits
    vals = lay.vals
    x = x.contiguous()
    gu, dn = _fit(gu, hdim, g), _fit(dn, idim, g)
    h = torch.empty((m * topk, idim), device=x.device, dtype=torch.float32)
    split = dn.split_k > 1
    y = torch.empty((m, hdim), device=x.device, dtype=torch.float32 if split else x.dtype) if split or out is None \
        else out
    wdt = _tl_dtype(lay.weight_dtype)
    o = lay.offsets
    grid1 = (triton.cdiv(idim // vals, gu.block_n), m * topk)
    if split and grid1[0] * grid1[1] * gu.block_n * vals < m * hdim:
        y.zero_()  # the gate-up grid is too small to clear it on the way (never at Mixtral shapes)
        split_zero = False
    else:
        split_zero = split
    if lay.packing == PLANES3:
        from coordinator import planes3  # it builds on this module's Triton helpers

        planes3.launch(x, base, stride, slots, w, topk, indirect, lay, h, y, split_zero, gu, dn)
        return _finish(x, y, out, split)
    _gate_up_kernel[grid1](x, base, slots, stride, h, y, m * hdim, o[0], o[1], o[2], o[3], o[4], o[5],
                           hdim, idim, g, bits, topk, indirect, split_zero, wdt,
                           BN=gu.block_n, GPB=gu.groups_per_block, WORDS=_words(gu, g), META8=lay.meta8,
                           num_warps=gu.num_warps, num_stages=gu.num_stages)
    grid2 = (triton.cdiv(hdim // vals, dn.block_n), dn.split_k, m)
    _down_kernel[grid2](h, base, slots, stride, w, y, o[6], o[7], o[8], hdim, idim, g, bits, topk,
                        indirect, dn.split_k, wdt, BN=dn.block_n, GPB=dn.groups_per_block,
                        WORDS=_words(dn, g), META8=lay.meta8, num_warps=dn.num_warps, num_stages=dn.num_stages)
    return _finish(x, y, out, split)


def _finish(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None, split: bool) -> torch.Tensor:
    """The result in x's dtype (split-K accumulated in fp32), written into ``out`` when given."""
    if not split:
        return y
    if out is None:
        return y.to(x.dtype)
    return out.copy_(y)


def packed_linear(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  shape: tuple[int, int], bits: int, group_size: int, cfg: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] @ W.T for one hqq u8-packed (axis=1) matrix W [N, K] on CUDA (e.g. 4-bit attention)."""
    n, k = shape
    cfg = cfg or LINEAR
    cfg = _fit(cfg, k, group_size)
    y = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n // (8 // bits), cfg.block_n), x.shape[0])
    _linear_kernel[grid](x.contiguous(), w_q, scale, zero, y, n, k, group_size, bits, BN=cfg.block_n,
                         GPB=cfg.groups_per_block, WORDS=_words(cfg, group_size), num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)
    return y


def dequantize(w_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int], bits: int,
               group_size: int, packing: str, dtype: torch.dtype, out: torch.Tensor | None = None,
               rows: tuple[int, int] | None = None, meta8: bool = False) -> torch.Tensor:
    """The [N, K] weight of one hqq-packed matrix (or its rows n0 ≤ n < n1: ``rows``), dequantized on the GPU by
    one Triton launch (any packing; equals hqq's Quantizer.dequantize up to the final rounding). ``meta8``:
    scale and zero start at their tables (``expert_workers.meta8``), and the codes follow in memory."""
    (first, total), n_out = row_span(shape, rows)
    w = out if out is not None else torch.empty((n_out, shape[1]), device=w_q.device, dtype=dtype)
    step = w_q.shape[0] if w_q.dim() == 2 else w_q.numel() // group_size
    block = 1024
    _dequant_kernel[(triton.cdiv(total - first, block),)](w_q, scale, zero, w, first, total, step, group_size, bits,
                                                          _WORD_TOP[packing], BLOCK=block, META8=meta8)
    return w


def row_span(shape: tuple[int, int], rows: tuple[int, int] | None) -> tuple[tuple[int, int], int]:
    """((first, end) flat element range, row count) of rows n0 ≤ n < n1 (all rows: None) of an [N, K] matrix,
    checked against the dequantize kernels' int32 indexing."""
    n, k = shape
    n0, n1 = rows if rows is not None else (0, n)
    if not 0 <= n0 < n1 <= n:
        raise ValueError(f"rows {n0}..{n1} outside a matrix of {n} rows")
    if n * k >= 2 ** 31:
        raise ValueError(f"matrix of {n * k} weights is too large for the int32 dequantize kernel")
    return (n0 * k, n1 * k), n1 - n0


# ------------------------------------------------------------------------------------------ slow paths
_LAYOUTS: dict[int, tuple[ExpertManifest, PackedLayout]] = {}


def layout_of(manifest: ExpertManifest) -> PackedLayout:
    """PackedLayout of a manifest, memoised by identity (manifests are reused across calls)."""
    hit = _LAYOUTS.get(id(manifest))
    if hit is not None and hit[0] is manifest:
        return hit[1]
    lay = PackedLayout.from_manifest(manifest)
    if len(_LAYOUTS) > 4096:
        _LAYOUTS.clear()
    _LAYOUTS[id(manifest)] = (manifest, lay)
    return lay


def views_of(buf: torch.Tensor, manifest: ExpertManifest) -> dict[str, dict[str, torch.Tensor]]:
    """Re-export of format.tensor_views for callers that only import this module."""
    return tensor_views(buf, manifest)
