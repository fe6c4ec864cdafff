"""Triton kernels for 3-bit experts stored as two planes (``expert_workers.format.PLANES3``).

Shape legend (one [N, K] matrix, groups of g along K, R = N·K/g group rows, NV = N/8):

    lo  [N/4, K] uint8   hqq "2bit_u8" of the codes' low 2 bits: byte (r, k) holds W[r + u·N/4, k], u = 0..3
    hi  [N/8, K] uint8   hqq "1bit_u8" of the high bit:            byte (n, k) holds W[n + v·N/8, k], v = 0..7
    scale, zero [R]      W = (q − zero)·scale, group row of W[n, k] = n·(K/g) + k//g

A GEMV program owns BN rows n < NV and computes the 8 output rows n + v·NV from three bytes per k: hi (n, k)
and lo (n, k), (n + NV, k) (output row n + v·NV is lo's row n + (v mod 2)·NV, slot v // 2). So every byte is
read once and a tile computes 8·BN outputs, as the u8 kernels of ``coordinator.gpu_kernels`` do with 8/bits,
and like them with one accumulator per output row set, unrolled, and constant shifts. (The 8 rows as one
tensor axis, [BN, 8, GPB, g], took 0.59 ms for two Mixtral experts on the H200: the broadcast of each loaded
byte over that axis costs more than the arithmetic.) By words (``GemvConfig.words``, the default), each plane
is read as int32 words of four k, and the high plane's word is shifted left by 1 + v mod 2 so its bit lands
just above the low plane's field: one more mask-or gives (lo + 4·hi)·2^e, as in ``coordinator.gemv_steps``.
"""

from __future__ import annotations

from typing import Any

import torch

from coordinator import gpu_kernels as gk

if gk.HAVE_TRITON:
    import triton
    import triton.language as tl

    from coordinator.gemv_steps import emit, group_meta, rowsum, x_tile, xw_tile

    @triton.jit
    def _eighth(lo, hi, s_ptr, z_ptr, gi0, gmask, x3, acc, V: tl.constexpr, NVG: tl.constexpr,
                META8: tl.constexpr):
        """acc[BN, GPB, GROUP] += dequant(output row n + V·NV) · x, from the bytes lo (of row n + (V mod 2)·NV)
        and hi (of row n); shifts are constants, as in ``gpu_kernels._quarter``."""
        gi = gi0 + V * NVG
        s = group_meta(s_ptr, gi, gmask, META8)
        z = group_meta(z_ptr, gi, gmask, META8)
        SH_LO: tl.constexpr = 6 - 2 * (V // 2)
        SH_HI: tl.constexpr = 7 - V
        q = ((lo >> SH_LO) & 3) | (((hi >> SH_HI) & 1) << 2)
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # int -> float without I2F
        w = qf * s[:, :, None] - (z * s)[:, :, None]
        return acc + w * x3

    @triton.jit
    def _step(lo_ptr, hi_ptr, s_ptr, z_ptr, x3, rows, row_mask, kb, a0, a1, a2, a3, a4, a5, a6, a7,
              NV: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr, META8: tl.constexpr):
        """One K step (GPB groups) of W·x for the 8 output rows n + v·NV of each of the BN rows n (a0..a7)."""
        G: tl.constexpr = K // GROUP
        g = kb * GPB + tl.arange(0, GPB)
        off = rows[:, None, None] * K + g[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
        m3 = row_mask[:, None, None]
        even = tl.load(lo_ptr + off, mask=m3, other=0).to(tl.int32)             # rows n + 2u·NV
        odd = tl.load(lo_ptr + off + NV * K, mask=m3, other=0).to(tl.int32)     # rows n + (2u + 1)·NV
        hi = tl.load(hi_ptr + off, mask=m3, other=0).to(tl.int32)               # rows n + v·NV
        gi0 = rows[:, None] * G + g[None, :]                                     # [BN, GPB]
        gm = row_mask[:, None]
        a0 = _eighth(even, hi, s_ptr, z_ptr, gi0, gm, x3, a0, 0, NV * G, META8)
        a1 = _eighth(odd, hi, s_ptr, z_ptr, gi0, gm, x3, a1, 1, NV * G, META8)
        a2 = _eighth(even, hi, s_ptr, z_ptr, gi0, gm, x3, a2, 2, NV * G, META8)
        a3 = _eighth(odd, hi, s_ptr, z_ptr, gi0, gm, x3, a3, 3, NV * G, META8)
        a4 = _eighth(even, hi, s_ptr, z_ptr, gi0, gm, x3, a4, 4, NV * G, META8)
        a5 = _eighth(odd, hi, s_ptr, z_ptr, gi0, gm, x3, a5, 5, NV * G, META8)
        a6 = _eighth(even, hi, s_ptr, z_ptr, gi0, gm, x3, a6, 6, NV * G, META8)
        a7 = _eighth(odd, hi, s_ptr, z_ptr, gi0, gm, x3, a7, 7, NV * G, META8)
        return a0, a1, a2, a3, a4, a5, a6, a7

    @triton.jit
    def _field3(lo, hs, s_e, zs, E: tl.constexpr):
        """(q − zero)·scale with q = lo + 4·hi: lo's field at bits E..E+1, hs's (hi shifted into place) at E+2,
        or-ed into 2^23's mantissa (as ``gemv_steps.field``)."""
        qf = ((lo & (3 << E)) | (hs & (4 << E)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        return qf * s_e - zs

    @triton.jit
    def _weighth(lo0, lo16, h0, h16, s_ptr, z_ptr, gi0, gmask, xs0, xs1, xs2, xs3, acc,
                 V: tl.constexpr, NVG: tl.constexpr, META8: tl.constexpr):
        """``_eighth`` from int32 words: lo0/lo16 hold lo's bytes 0-1/2-3, h0/h16 hi's, shifted left by
        1 + V mod 2 so that hi's bit 7 − V lands just above lo's field; byte b multiplies xs_b."""
        gi = gi0 + V * NVG
        s = group_meta(s_ptr, gi, gmask, META8)
        z = group_meta(z_ptr, gi, gmask, META8)
        E: tl.constexpr = 6 - 2 * (V // 2)
        s_lo = (s * (1.0 / (1 << E)))[:, :, None]
        s_hi = s_lo * (1.0 / 256.0)
        zs = (z * s)[:, :, None]
        acc += _field3(lo0, h0, s_lo, zs, E) * xs0
        acc += _field3(lo0, h0, s_hi, zs, E + 8) * xs1
        acc += _field3(lo16, h16, s_lo, zs, E) * xs2
        return acc + _field3(lo16, h16, s_hi, zs, E + 8) * xs3

    @triton.jit
    def _wstep(lo_ptr, hi_ptr, s_ptr, z_ptr, xs0, xs1, xs2, xs3, rows, row_mask, kb,
               a0, a1, a2, a3, a4, a5, a6, a7, NV: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr,
               GPB: tl.constexpr, META8: tl.constexpr):
        """``_step`` on int32 words (GemvConfig.words): K/4 words per row, word j of group g = bytes 4j..4j+3."""
        G: tl.constexpr = K // GROUP
        GW: tl.constexpr = GROUP // 4
        g = kb * GPB + tl.arange(0, GPB)
        off = rows[:, None, None] * (K // 4) + g[None, :, None] * GW + tl.arange(0, GW)[None, None, :]
        m3 = row_mask[:, None, None]
        lo_w = lo_ptr.to(tl.pointer_type(tl.int32))
        even = tl.load(lo_w + off, mask=m3, other=0)
        odd = tl.load(lo_w + off + NV * (K // 4), mask=m3, other=0)
        hi = tl.load(hi_ptr.to(tl.pointer_type(tl.int32)) + off, mask=m3, other=0)
        even16, odd16, hi16 = even >> 16, odd >> 16, hi >> 16
        he, he16, ho, ho16 = hi << 1, hi16 << 1, hi << 2, hi16 << 2
        gi0 = rows[:, None] * G + g[None, :]
        gm = row_mask[:, None]
        a0 = _weighth(even, even16, he, he16, s_ptr, z_ptr, gi0, gm, xs0, xs1, xs2, xs3, a0, 0, NV * G, META8)
        a1 = _weighth(odd, odd16, ho, ho16, s_ptr, z_ptr, gi0, gm, xs0, xs1, xs2, xs3, a1, 1, NV * G, META8)
        a2 = _weighth(even, even16, he, he16, s_ptr, z_ptr, gi0, gm, xs0, xs1, xs2, xs3, a2, 2, NV * G, META8)
        a3 = _weighth(odd, odd16, ho, ho16, s_ptr, z_ptr, gi0, gm, xs0, xs1, xs2, xs3, a3, 3, NV * G, META8)
        a4 = _weighth(even, even16, he, he16, s_ptr, z_ptr, gi0, gm, xs0, xs1, xs2, xs3, a4, 4, NV * G, META8)
        a5 = _weighth(odd, odd16, ho, ho16, s_ptr, z_ptr, gi0, gm, xs0, xs1, xs2, xs3, a5, 5, NV * G, META8)
        a6 = _weighth(even, even16, he, he16, s_ptr, z_ptr, gi0, gm, xs0, xs1, xs2, xs3, a6, 6, NV * G, META8)
        a7 = _weighth(odd, odd16, ho, ho16, s_ptr, z_ptr, gi0, gm, xs0, xs1, xs2, xs3, a7, 7, NV * G, META8)
        return a0, a1, a2, a3, a4, a5, a6, a7

    @triton.jit
    def _kstep(lo_ptr, hi_ptr, s_ptr, z_ptr, x_ptr, rows, row_mask, kb, a0, a1, a2, a3, a4, a5, a6, a7,
               NV: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr, WORDS: tl.constexpr,
               META8: tl.constexpr):
        """One K step of W·x[x_ptr] for one matrix, by words or by bytes."""
        if WORDS:
            a0, a1, a2, a3, a4, a5, a6, a7 = _wstep(
                lo_ptr, hi_ptr, s_ptr, z_ptr, xw_tile(x_ptr, kb, 0, GROUP, GPB), xw_tile(x_ptr, kb, 1, GROUP, GPB),
                xw_tile(x_ptr, kb, 2, GROUP, GPB), xw_tile(x_ptr, kb, 3, GROUP, GPB), rows, row_mask, kb,
                a0, a1, a2, a3, a4, a5, a6, a7, NV, K, GROUP, GPB, META8)
        else:
            a0, a1, a2, a3, a4, a5, a6, a7 = _step(lo_ptr, hi_ptr, s_ptr, z_ptr, x_tile(x_ptr, kb, GROUP, GPB),
                                                   rows, row_mask, kb, a0, a1, a2, a3, a4, a5, a6, a7,
                                                   NV, K, GROUP, GPB, META8)
        return a0, a1, a2, a3, a4, a5, a6, a7

    @triton.jit
    def _silu_mul_store(out, g, u, row_mask):
        a, b = rowsum(g), rowsum(u)
        tl.store(out, a / (1.0 + tl.exp(-a)) * b, mask=row_mask)

    @triton.jit
    def _gate_up_kernel(x_ptr, base_ptr, slots_ptr, slot_stride, h_ptr, zero_ptr, zero_n,
                        OQ1: tl.constexpr, OH1: tl.constexpr, OS1: tl.constexpr, OZ1: tl.constexpr,
                        OQ3: tl.constexpr, OH3: tl.constexpr, OS3: tl.constexpr, OZ3: tl.constexpr,
                        H: tl.constexpr, I: tl.constexpr, GROUP: tl.constexpr, TOPK: tl.constexpr,
                        INDIRECT: tl.constexpr, ZERO_OUT: tl.constexpr, WDT: tl.constexpr,
                        BN: tl.constexpr, GPB: tl.constexpr, WORDS: tl.constexpr, META8: tl.constexpr):
        """h[p, :] = silu(w1 x) * (w3 x) for pair p = program_id(1) (token p // TOPK, slot slots[p])."""
        NV: tl.constexpr = I // 8
        pid_n = tl.program_id(0)
        pair = tl.program_id(1)
        if ZERO_OUT:  # clear the down kernel's split-K accumulator on the way (saves a launch)
            zi = (pair * tl.num_programs(0) + pid_n) * (BN * 8) + tl.arange(0, BN * 8)
            tl.store(zero_ptr + zi, tl.zeros([BN * 8], tl.float32), mask=zi < zero_n)
        base = base_ptr
        if INDIRECT:
            base = base_ptr + tl.load(slots_ptr + pair).to(tl.int64) * slot_stride
        s1, z1 = (base + OS1).to(tl.pointer_type(WDT)), (base + OZ1).to(tl.pointer_type(WDT))
        s3, z3 = (base + OS3).to(tl.pointer_type(WDT)), (base + OZ3).to(tl.pointer_type(WDT))
        x_row = x_ptr + (pair // TOPK) * H
        rows = pid_n * BN + tl.arange(0, BN)
        row_mask = rows < NV
        z = tl.zeros([BN, GPB, GROUP // 4 if WORDS else GROUP], tl.float32)
        g0, g1, g2, g3, g4, g5, g6, g7 = z, z, z, z, z, z, z, z
        u0, u1, u2, u3, u4, u5, u6, u7 = z, z, z, z, z, z, z, z
        for kb in range(0, H // (GPB * GROUP)):
            g0, g1, g2, g3, g4, g5, g6, g7 = _kstep(base + OQ1, base + OH1, s1, z1, x_row, rows, row_mask, kb,
                                                    g0, g1, g2, g3, g4, g5, g6, g7, NV, H, GROUP, GPB, WORDS,
                                                    META8)
            u0, u1, u2, u3, u4, u5, u6, u7 = _kstep(base + OQ3, base + OH3, s3, z3, x_row, rows, row_mask, kb,
                                                    u0, u1, u2, u3, u4, u5, u6, u7, NV, H, GROUP, GPB, WORDS,
                                                    META8)
        out = h_ptr + pair * I + rows
        _silu_mul_store(out, g0, u0, row_mask)
        _silu_mul_store(out + NV, g1, u1, row_mask)
        _silu_mul_store(out + 2 * NV, g2, u2, row_mask)
        _silu_mul_store(out + 3 * NV, g3, u3, row_mask)
        _silu_mul_store(out + 4 * NV, g4, u4, row_mask)
        _silu_mul_store(out + 5 * NV, g5, u5, row_mask)
        _silu_mul_store(out + 6 * NV, g6, u6, row_mask)
        _silu_mul_store(out + 7 * NV, g7, u7, row_mask)

    @triton.jit
    def _down_kernel(h_ptr, base_ptr, slots_ptr, slot_stride, w_ptr, y_ptr,
                     OQ: tl.constexpr, OH: tl.constexpr, OS: tl.constexpr, OZ: tl.constexpr,
                     H: tl.constexpr, I: tl.constexpr, GROUP: tl.constexpr, TOPK: tl.constexpr,
                     INDIRECT: tl.constexpr, SPLIT_K: tl.constexpr, WDT: tl.constexpr,
                     BN: tl.constexpr, GPB: tl.constexpr, WORDS: tl.constexpr, META8: tl.constexpr):
        """y[m] (+)= Σ_t weight[m, t] · w2_slot(m,t) · h[m·TOPK + t]; program (rows, K split, token m)."""
        NV: tl.constexpr = H // 8
        NKB: tl.constexpr = I // (GPB * GROUP)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        rows = pid_n * BN + tl.arange(0, BN)
        row_mask = rows < NV
        zo = tl.zeros([BN], tl.float32)
        o0, o1, o2, o3, o4, o5, o6, o7 = zo, zo, zo, zo, zo, zo, zo, zo
        for t in range(TOPK):
            pair = m * TOPK + t
            base = base_ptr
            wt = 1.0
            if INDIRECT:
                base = base_ptr + tl.load(slots_ptr + pair).to(tl.int64) * slot_stride
                wt = tl.load(w_ptr + pair).to(tl.float32)
            s, z = (base + OS).to(tl.pointer_type(WDT)), (base + OZ).to(tl.pointer_type(WDT))
            za = tl.zeros([BN, GPB, GROUP // 4 if WORDS else GROUP], tl.float32)
            a0, a1, a2, a3, a4, a5, a6, a7 = za, za, za, za, za, za, za, za
            for kb in range(pid_k, NKB, SPLIT_K):
                a0, a1, a2, a3, a4, a5, a6, a7 = _kstep(base + OQ, base + OH, s, z, h_ptr + pair * I, rows, row_mask,
                                                        kb, a0, a1, a2, a3, a4, a5, a6, a7, NV, I, GROUP, GPB, WORDS,
                                                        META8)
            o0 += wt * rowsum(a0)
            o1 += wt * rowsum(a1)
            o2 += wt * rowsum(a2)
            o3 += wt * rowsum(a3)
            o4 += wt * rowsum(a4)
            o5 += wt * rowsum(a5)
            o6 += wt * rowsum(a6)
            o7 += wt * rowsum(a7)
        out = y_ptr + m * H + rows
        emit(out, o0, row_mask, SPLIT_K)
        emit(out + NV, o1, row_mask, SPLIT_K)
        emit(out + 2 * NV, o2, row_mask, SPLIT_K)
        emit(out + 3 * NV, o3, row_mask, SPLIT_K)
        emit(out + 4 * NV, o4, row_mask, SPLIT_K)
        emit(out + 5 * NV, o5, row_mask, SPLIT_K)
        emit(out + 6 * NV, o6, row_mask, SPLIT_K)
        emit(out + 7 * NV, o7, row_mask, SPLIT_K)

    @triton.jit
    def _dequant_kernel(lo_ptr, hi_ptr, s_ptr, z_ptr, w_ptr, first, total, step,
                        GROUP: tl.constexpr, BLOCK: tl.constexpr, META8: tl.constexpr):
        """w[e − first] = (q(e) − zero[r]) · scale[r] for the elements first ≤ e < total of [N, K]; step = hi's
        rows (R'/8)."""
        e = first + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: the caller checks N·K < 2**31
        mask = e < total
        r = e // GROUP
        j = e % GROUP
        lo = tl.load(lo_ptr + (r % (2 * step)) * GROUP + j, mask=mask, other=0).to(tl.int32)
        hi = tl.load(hi_ptr + (r % step) * GROUP + j, mask=mask, other=0).to(tl.int32)
        q = ((lo >> (6 - 2 * (r // (2 * step)))) & 3) | (((hi >> (7 - r // step)) & 1) << 2)
        s = group_meta(s_ptr, r, mask, META8)
        z = group_meta(z_ptr, r, mask, META8)
        tl.store(w_ptr + (e - first), ((q.to(tl.float32) - z) * s).to(w_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, base: torch.Tensor, stride: int, slots: torch.Tensor, w: torch.Tensor, topk: int,
           indirect: bool, lay: gk.PackedLayout, h: torch.Tensor, y: torch.Tensor, zero_out: bool,
           gu: gk.GemvConfig, dn: gk.GemvConfig) -> None:
    """The gate-up then down launches of ``gpu_kernels._launch`` for a PLANES3 layout (h, y allocated there)."""
    m, hdim, idim, g = x.shape[0], lay.hidden, lay.inter, lay.group_size
    wdt: Any = gk._tl_dtype(lay.weight_dtype)
    o, oh = lay.offsets, lay.hi_offsets
    grid1 = (triton.cdiv(idim // 8, gu.block_n), m * topk)
    _gate_up_kernel[grid1](x, base, slots, stride, h, y, m * hdim, o[0], oh[0], o[1], o[2], o[3], oh[1], o[4], o[5],
                           hdim, idim, g, topk, indirect, zero_out, wdt, BN=gu.block_n, GPB=gu.groups_per_block,
                           WORDS=gk._words(gu, g), META8=lay.meta8, num_warps=gu.num_warps,
                           num_stages=gu.num_stages)
    grid2 = (triton.cdiv(hdim // 8, dn.block_n), dn.split_k, m)
    _down_kernel[grid2](h, base, slots, stride, w, y, o[6], oh[2], o[7], o[8], hdim, idim, g, topk, indirect,
                        dn.split_k, wdt, BN=dn.block_n, GPB=dn.groups_per_block, WORDS=gk._words(dn, g),
                        META8=lay.meta8, num_warps=dn.num_warps, num_stages=dn.num_stages)


def dequantize(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               shape: tuple[int, int], group_size: int, out: torch.Tensor,
               rows: tuple[int, int] | None = None, meta8: bool = False) -> torch.Tensor:
    """The [N, K] weight of one PLANES3 matrix (or its rows n0 ≤ n < n1: ``rows``) into ``out`` by one Triton
    launch (equals ``format.dequantize_views`` up to the final rounding); ``meta8`` as in
    ``gpu_kernels.dequantize``."""
    (first, total), _ = gk.row_span(shape, rows)
    block = 1024
    _dequant_kernel[(triton.cdiv(total - first, block),)](lo, hi, scale, zero, out, first, total,
                                                          hi.numel() // group_size, group_size, BLOCK=block,
                                                          META8=meta8)
    return out
