"""Triton building blocks of the packed GEMV kernels (``coordinator.gpu_kernels``, ``coordinator.planes3``):
one K step of W·x for a tile of packed rows, reading hqq's u8 packing by bytes (``qstep``) or by int32 words
(``wstep``), plus the tile loads, zeroed accumulators, reductions and the split-K store they share.

Shape legend (one hqq "Nbit_u8" matrix [N, K], V = 8/bits values per byte, NV = N/V packed rows, groups of g):

    tile      [BN, GPB, g]    bytes of BN packed rows × GPB groups (by bytes)
              [BN, GPB, g/4]  int32 words of the same rows and groups (by words: word j = bytes 4j..4j+3)
    acc       one tile-shaped fp32 accumulator per quarter v (output rows n + v·NV), reduced once after K
    scale/zero [N·K/g] per group row, W = (q − zero)·scale; at 8 meta bits (``META8``) each is a table of
              256 values followed by a uint8 code per group row (``expert_workers.meta8``)

By bytes, each byte is unpacked to an int and each field shifted, masked and or-ed into the mantissa of 2^23
(one FADD then gives q as a float: no I2F). By words, the field of byte b stays in place: masked and or-ed into
2^23's mantissa it reads as q·2^e, and the group's scale·2^−e undoes the power of two exactly; one integer
instruction a weight instead of about three, the same products bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from expert_workers.meta8 import LUT_ENTRIES

TABLE: tl.constexpr = tl.constexpr(LUT_ENTRIES)
"""Entries of an 8-bit meta table: its codes start this many values after it."""


@triton.jit
def group_meta(p, gi, gmask, META8: tl.constexpr):
    """Group rows ``gi``'s scale (or zero) in fp32: ``p[gi]``, or at 8 meta bits ``p[code[gi]]``, where ``p``
    is the table (TABLE values) and the uint8 codes follow it. The table is 512 bytes, so its second load hits
    L1."""
    if META8:
        code = tl.load((p + TABLE).to(tl.pointer_type(tl.uint8)) + gi, mask=gmask, other=0).to(tl.int32)
        v = tl.load(p + code)
    else:
        v = tl.load(p + gi, mask=gmask, other=0)
    return v.to(tl.float32)


@triton.jit
def quarter(p, s_ptr, z_ptr, gi0, gmask, x3, acc, QI: tl.constexpr, NVG: tl.constexpr, BITS: tl.constexpr,
            META8: tl.constexpr):
    """acc[BN, GPB, GROUP] += dequant(quarter QI of bytes p) · x for output rows n' + QI·N/V.
    The 2^23 "magic number" turns the integer into a float with one OR and one FADD (no I2F)."""
    gi = gi0 + QI * NVG
    s = group_meta(s_ptr, gi, gmask, META8)
    z = group_meta(z_ptr, gi, gmask, META8)
    SH: tl.constexpr = 8 - BITS * (QI + 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    qf = (((p >> SH) & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    w = qf * s[:, :, None] - (z * s)[:, :, None]
    return acc + w * x3


@triton.jit
def qstep(q_ptr, s_ptr, z_ptr, x3, rows, row_mask, kb, a0, a1, a2, a3,
          NV: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
          BN: tl.constexpr, GPB: tl.constexpr, META8: tl.constexpr):
    """One K step (GPB groups) of W·x for BN packed rows, all V = 8/BITS quarters (a0..a3)."""
    V: tl.constexpr = 8 // BITS
    G: tl.constexpr = K // GROUP
    g = kb * GPB + tl.arange(0, GPB)
    j = tl.arange(0, GROUP)
    p = tl.load(q_ptr + rows[:, None, None] * K + g[None, :, None] * GROUP + j[None, None, :],
                mask=row_mask[:, None, None], other=0).to(tl.int32)          # [BN, GPB, GROUP]
    gi0 = rows[:, None] * G + g[None, :]                                      # [BN, GPB]
    gmask = row_mask[:, None]
    a0 = quarter(p, s_ptr, z_ptr, gi0, gmask, x3, a0, 0, NV * G, BITS, META8)
    if V >= 2:
        a1 = quarter(p, s_ptr, z_ptr, gi0, gmask, x3, a1, 1, NV * G, BITS, META8)
    if V >= 4:
        a2 = quarter(p, s_ptr, z_ptr, gi0, gmask, x3, a2, 2, NV * G, BITS, META8)
        a3 = quarter(p, s_ptr, z_ptr, gi0, gmask, x3, a3, 3, NV * G, BITS, META8)
    return a0, a1, a2, a3


@triton.jit
def field(src, s_e, zs, E: tl.constexpr, MASK: tl.constexpr):
    """(q − zero)·scale for the field at bits E.. of ``src``: masked and or-ed into 2^23's mantissa, it reads
    as q·2^E after one FADD, and ``s_e`` = scale·2^-E undoes the power of two exactly."""
    qf = ((src & (MASK << E)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return qf * s_e - zs


@triton.jit
def wquarter(t0, t16, s_ptr, z_ptr, gi0, gmask, xs0, xs1, xs2, xs3, acc,
             QI: tl.constexpr, NVG: tl.constexpr, BITS: tl.constexpr, META8: tl.constexpr):
    """acc[BN, GPB, GROUP/4] += quarter QI of the 4 bytes of each word (t0: bytes 0-1 at bits 0-15, t16:
    bytes 2-3), byte b against x[4j + b] (xs0..xs3)."""
    gi = gi0 + QI * NVG
    s = group_meta(s_ptr, gi, gmask, META8)
    z = group_meta(z_ptr, gi, gmask, META8)
    SH: tl.constexpr = 8 - BITS * (QI + 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    s_lo = (s * (1.0 / (1 << SH)))[:, :, None]
    s_hi = s_lo * (1.0 / 256.0)
    zs = (z * s)[:, :, None]
    acc += field(t0, s_lo, zs, SH, MASK) * xs0
    acc += field(t0, s_hi, zs, SH + 8, MASK) * xs1
    acc += field(t16, s_lo, zs, SH, MASK) * xs2
    return acc + field(t16, s_hi, zs, SH + 8, MASK) * xs3


@triton.jit
def wstep(q_ptr, s_ptr, z_ptr, xs0, xs1, xs2, xs3, rows, row_mask, kb, a0, a1, a2, a3,
          NV: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
          BN: tl.constexpr, GPB: tl.constexpr, META8: tl.constexpr):
    """``qstep`` on int32 words: W_q row n' holds K/4 words, word j of group g = bytes 4j..4j+3."""
    V: tl.constexpr = 8 // BITS
    G: tl.constexpr = K // GROUP
    GW: tl.constexpr = GROUP // 4
    g = kb * GPB + tl.arange(0, GPB)
    w = tl.load(q_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None, None] * (K // 4) + g[None, :, None] * GW
                + tl.arange(0, GW)[None, None, :], mask=row_mask[:, None, None], other=0)  # [BN, GPB, GW]
    t16 = w >> 16
    gi0 = rows[:, None] * G + g[None, :]
    gmask = row_mask[:, None]
    a0 = wquarter(w, t16, s_ptr, z_ptr, gi0, gmask, xs0, xs1, xs2, xs3, a0, 0, NV * G, BITS, META8)
    if V >= 2:
        a1 = wquarter(w, t16, s_ptr, z_ptr, gi0, gmask, xs0, xs1, xs2, xs3, a1, 1, NV * G, BITS, META8)
    if V >= 4:
        a2 = wquarter(w, t16, s_ptr, z_ptr, gi0, gmask, xs0, xs1, xs2, xs3, a2, 2, NV * G, BITS, META8)
        a3 = wquarter(w, t16, s_ptr, z_ptr, gi0, gmask, xs0, xs1, xs2, xs3, a3, 3, NV * G, BITS, META8)
    return a0, a1, a2, a3


@triton.jit
def xw_tile(x_ptr, kb, B: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr):
    """x[g·GROUP + 4j + B] as [1, GPB, GROUP/4]: the activations byte B of each word multiplies."""
    g = kb * GPB + tl.arange(0, GPB)
    j = tl.arange(0, GROUP // 4)
    return tl.load(x_ptr + g[:, None] * GROUP + 4 * j[None, :] + B).to(tl.float32)[None, :, :]


@triton.jit
def kstep(q_ptr, s_ptr, z_ptr, x_ptr, rows, row_mask, kb, a0, a1, a2, a3, NV: tl.constexpr,
          K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr, GPB: tl.constexpr,
          WORDS: tl.constexpr, META8: tl.constexpr):
    """One K step of W·x[x_ptr], by words or by bytes (one matrix per x tile)."""
    if WORDS:
        a0, a1, a2, a3 = wstep(q_ptr, s_ptr, z_ptr, xw_tile(x_ptr, kb, 0, GROUP, GPB),
                               xw_tile(x_ptr, kb, 1, GROUP, GPB), xw_tile(x_ptr, kb, 2, GROUP, GPB),
                               xw_tile(x_ptr, kb, 3, GROUP, GPB), rows, row_mask, kb, a0, a1, a2, a3,
                               NV, K, GROUP, BITS, BN, GPB, META8)
    else:
        a0, a1, a2, a3 = qstep(q_ptr, s_ptr, z_ptr, x_tile(x_ptr, kb, GROUP, GPB), rows, row_mask, kb,
                               a0, a1, a2, a3, NV, K, GROUP, BITS, BN, GPB, META8)
    return a0, a1, a2, a3


@triton.jit
def x_tile(x_ptr, kb, GROUP: tl.constexpr, GPB: tl.constexpr):
    g = kb * GPB + tl.arange(0, GPB)
    return tl.load(x_ptr + g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]).to(tl.float32)[None, :, :]


@triton.jit
def zeros4(BN: tl.constexpr, GPB: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr):
    V: tl.constexpr = 8 // BITS
    a0 = tl.zeros([BN, GPB, GROUP], tl.float32)
    if V >= 2:
        a1 = tl.zeros([BN, GPB, GROUP], tl.float32)
    else:
        a1 = tl.zeros([1, 1, 1], tl.float32)
    if V >= 4:
        a2 = tl.zeros([BN, GPB, GROUP], tl.float32)
        a3 = tl.zeros([BN, GPB, GROUP], tl.float32)
    else:
        a2 = tl.zeros([1, 1, 1], tl.float32)
        a3 = tl.zeros([1, 1, 1], tl.float32)
    return a0, a1, a2, a3


@triton.jit
def rowsum(a):
    return tl.sum(tl.sum(a, axis=2), axis=1)


@triton.jit
def emit(ptr, val, mask, SPLIT_K: tl.constexpr):
    if SPLIT_K == 1:
        tl.store(ptr, val.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptr, val, mask=mask)
