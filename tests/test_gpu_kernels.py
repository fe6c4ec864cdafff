"""coordinator.gpu_kernels against hqq's own dequantize + matmul.

The GPU tests run on CUDA only (marked ``gpu``); the interpreter test runs the very same Triton kernels
through Triton's CPU interpreter in a subprocess, so CI without a GPU still checks the kernels' indexing.
No timings here: bench/kernel_bench.py measures them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

_CHECK = textwrap.dedent("""
    import sys, torch
    import torch.nn.functional as F
    from expert_workers.format import ExpertKey, QuantSpec, dequantize_matrix, pack_expert
    from coordinator import dequant_ffn
    from coordinator import gpu_kernels as gk

    def reference(x, buf, man):
        w1, w3, w2 = (dequantize_matrix(buf, man, n).float() for n in ("w1", "w3", "w2"))
        x = x.float()
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    dev, H, I, dtypes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
    quick = dev == "cpu"   # the interpreter is slow: fewer batch sizes and launch shapes
    if quick:   # prefill-sized calls dequantize ragged row blocks: w1/w3 in 96-row, w2 in 48-row blocks
        dequant_ffn.DEQUANT_CHUNK = 96 * H
        blocks = dequant_ffn.row_blocks
        assert blocks(I, H)[-1] == (192, I) and blocks(H, I)[-1] == (96, H), blocks(H, I)
    torch.manual_seed(0)
    worst = 0.0
    for bits, meta in ((2, 16), (3, 16), (2, 8), (3, 8)) + (() if quick else ((4, 16), (4, 8))):
        experts = []
        for e in range(3):
            w = {"w1": torch.randn(I, H) / H ** 0.5, "w3": torch.randn(I, H) / H ** 0.5,
                 "w2": torch.randn(H, I) / I ** 0.5}
            spec = QuantSpec(bits, 64, meta_bits=meta)
            buf, man = pack_expert(ExpertKey(0, e), {k: v.to(dev) for k, v in w.items()}, spec)
            experts.append((torch.from_numpy(buf).to(dev), man))
        lay = gk.layout_of(experts[0][1])
        assert lay.fused and (lay.packing == "3bit_planes_u8") == (bits == 3) and lay.meta8 == (meta == 8)
        slab = torch.stack([b for b, _ in experts])
        for dt in dtypes:
            dt = getattr(torch, dt)
            for m in ((1, 5) if quick else (1, 2, 5)):                      # 5 > GEMV_MAX_TOKENS: dequantize + matmul path
                x = torch.randn(m, H, device=dev, dtype=dt)
                refs = [reference(x, b, man) for b, man in experts]
                for (b, man), ref in zip(experts, refs):
                    y = gk.expert_ffn(x, b, man)
                    assert y.dtype == dt and y.shape == (m, H)
                    worst = max(worst, rel(y, ref))
                slots = torch.tensor([[2, 0]] * m, device=dev, dtype=torch.int32)
                wts = torch.tensor([[0.7, 0.3]] * m, device=dev)
                ref2 = 0.7 * refs[2] + 0.3 * refs[0]
                worst = max(worst, rel(gk.moe_ffn(x, slab, slots, wts, lay), ref2))
                if lay.fused and m <= gk.GEMV_MAX_TOKENS:
                    cfgs = (gk.GemvConfig(4, 1, 2, 2, 2), gk.GemvConfig(4, 1, 2, 2, 2, words=True),
                            gk.GemvConfig(8, 2, 4, 4, 3), gk.GemvConfig(8, 2, 4, 4, 3, words=True))  # split-K: atomics
                    assert gk.configs_for(lay)[0].words  # so the default calls above read by words
                    for cfg in cfgs[:1] if quick else cfgs:
                        worst = max(worst, rel(gk.moe_ffn(x, slab, slots, wts, lay, gate_up=cfg, down=cfg), ref2))
    from bench.synth import quantized_random   # 4-bit attention projection, by bytes and by words
    for bits in (4, 2):
        pm = quantized_random(96, H, bits, dev, 3)
        x = torch.randn(2, H, device=dev, dtype=getattr(torch, dtypes[0]))
        ref = F.linear(x.float(), gk.dequantize(pm.w_q, pm.scale, pm.zero, pm.shape, bits, 64, f"{bits}bit_u8",
                                                torch.float32))
        for words in (False, True):
            cfg = gk.GemvConfig(4, 1, 1, 2, 2, words=words)
            worst = max(worst, rel(gk.packed_linear(x, pm.w_q, pm.scale, pm.zero, pm.shape, bits, 64, cfg), ref))
    print("WORST", worst)
    assert worst < 1e-2, worst
""")


def _run_check(device: str, hidden: int, inter: int, dtypes: str, interpret: bool) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", _CHECK, device, str(hidden), str(inter), dtypes], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_launch_shapes_narrow_to_small_k() -> None:
    """A K step larger than K (a small model under Mixtral-tuned shapes) halves until it divides K; K that is
    not whole groups is refused. (test_fast_paths: such a model still takes the GEMV path.)"""
    from coordinator import gpu_kernels as gk

    cfg = gk.GemvConfig(block_n=8, groups_per_block=8, words=True)
    assert gk._fit(cfg, 4096, 64) is cfg
    assert gk._fit(cfg, 256, 64) == gk.GemvConfig(block_n=8, groups_per_block=4, words=True)
    assert gk._fit(cfg, 192, 64).groups_per_block == 1                  # 3 groups
    with pytest.raises(ValueError, match="group size"):
        gk._fit(cfg, 200, 64)


def test_row_spans_of_the_prefill_dequantize() -> None:
    """Row blocks cover a matrix once, in order, within DEQUANT_CHUNK weights; bad ranges are refused."""
    from coordinator import dequant_ffn
    from coordinator import gpu_kernels as gk

    assert gk.row_span((4, 8), (1, 3)) == ((8, 24), 2) and gk.row_span((4, 8), None) == ((0, 32), 4)
    for bad in ((2, 2), (-1, 2), (3, 5)):
        with pytest.raises(ValueError, match="outside"):
            gk.row_span((4, 8), bad)
    with pytest.raises(ValueError, match="too large"):
        gk.row_span((2 ** 16, 2 ** 15), (0, 1))
    blocks = dequant_ffn.row_blocks(14336, 4096)                                # Mixtral's w1: 7 blocks of 2048 rows
    assert blocks[0] == (0, 2048) and blocks[-1] == (12288, 14336) and len(blocks) == 7
    assert all(b[0] == a[1] for a, b in zip(blocks, blocks[1:]))
    assert max(n1 - n0 for n0, n1 in dequant_ffn.row_blocks(4096, 14336)) * 14336 <= dequant_ffn.DEQUANT_CHUNK


def test_kernels_match_hqq_in_triton_interpreter() -> None:
    """Same kernels, CPU interpreter: 2/3-bit fused GEMV (direct, slot-indirect, split-K), the prefill path's
    dequantize by ragged row blocks + matmul, with fp16 scales/zeros and with 8-bit tables (``meta_bits`` 8)
    against hqq's dequantize of the decoded tables."""
    pytest.importorskip("triton")
    out = _run_check("cpu", 128, 256, "float32", interpret=True)
    assert "WORST" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_match_hqq_on_gpu() -> None:
    _run_check("cuda", 1024, 2048, "float16,bfloat16", interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_ffn_replays_in_cuda_graph_with_new_slots() -> None:
    """Slots are read from device memory: a captured graph follows slot changes without re-capture."""
    from coordinator import gpu_kernels as gk
    from expert_workers.format import ExpertKey, QuantSpec, pack_expert

    H, I = 512, 1024
    experts = []
    for e in range(2):
        w = {"w1": torch.randn(I, H) / H ** 0.5, "w3": torch.randn(I, H) / H ** 0.5, "w2": torch.randn(H, I) / I ** 0.5}
        buf, man = pack_expert(ExpertKey(0, e), w, QuantSpec(2, 64))
        experts.append((torch.from_numpy(buf).cuda(), man))
    lay = gk.layout_of(experts[0][1])
    slab = torch.stack([b for b, _ in experts])
    x = torch.randn(1, H, device="cuda", dtype=torch.float16)
    slots = torch.tensor([[0, 1]], device="cuda", dtype=torch.int32)
    wts = torch.tensor([[1.0, 0.0]], device="cuda")
    gk.moe_ffn(x, slab, slots, wts, lay)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = gk.moe_ffn(x, slab, slots, wts, lay)
    g.replay()
    torch.testing.assert_close(y, gk.expert_ffn(x, experts[0][0], experts[0][1]))
    slots.copy_(torch.tensor([[1, 0]], device="cuda", dtype=torch.int32))
    g.replay()
    torch.testing.assert_close(y, gk.expert_ffn(x, experts[1][0], experts[1][1]))


_NORM_CHECK = textwrap.dedent("""
    import sys, torch
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm
    from coordinator.norm_kernels import FusedRMSNorm
    device = sys.argv[1]
    torch.manual_seed(0)
    # tolerance: two roundings to the dtype (normalized row, then the weight product); fp32 statistics may
    # differ in the last bit (sum order, rsqrt), which can move a half-precision rounding by one step
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        norm = MixtralRMSNorm(320, eps=1e-5).to(device=device, dtype=dtype)
        norm.weight.data = torch.randn(320, device=device).to(dtype)
        fused = FusedRMSNorm.wrap(norm)
        assert isinstance(fused, FusedRMSNorm), dtype  # the self-check accepted the kernel
        x = (torch.randn(3, 1, 320, device=device) * 4).to(dtype)
        got, want = fused(x), norm(x)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    print("NORM OK")
""")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_fused_rms_norm_matches_transformers(device: str) -> None:
    """The graph decoder's fused RMSNorm equals transformers' MixtralRMSNorm within two roundings of each dtype
    (float16, bfloat16, float32) on 3 rows of a non-power-of-two width; on CPU through the interpreter."""
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", _NORM_CHECK, device], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "NORM OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_expert_kernels_compile_for_the_gpu_without_one() -> None:
    """Triton's ahead-of-time compiler (with its bundled ptxas) builds the decode kernels for sm_90 at Mixtral's
    shapes and launch shapes, with fp16 scales/zeros and with 8-bit tables: the types and lowering the
    interpreter test cannot see are checked before a GPU session. (bench/kernel_sass.py reports their SASS.)"""
    pytest.importorskip("triton")
    from bench import kernel_sass

    for meta8 in (False, True):
        for name, fn, sig, const, cfg in kernel_sass.kernels(meta8):
            assert kernel_sass.compile_for(fn, sig, const, cfg, 90).asm["cubin"], (name, meta8)
