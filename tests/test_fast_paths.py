"""The choices the coordinator makes once at start for the GPU (which MoE path, which attention module) and the
bookkeeping that keeps each shared-memory page registered with CUDA at most once. Pure logic: runs on CPU. The
paths themselves are checked against hqq on CUDA in test_coordinator_gpu.py."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coordinator import gpu_kernels as gk
from coordinator.moe import HQQ_PATH, gpu_expert_ffn, select_path
from coordinator.pinning import HostRegistry
from expert_workers.format import ExpertKey, ExpertManifest, MatrixEntry, QuantSpec, pack_expert

CUDA = torch.device("cuda")


@lru_cache(maxsize=None)
def _manifests(bits: int, hidden: int = 256, inter: int = 512, n: int = 2, group: int = 64
               ) -> dict[ExpertKey, ExpertManifest]:
    torch.manual_seed(0)
    out = {}
    for e in range(n):
        w = {"w1": torch.randn(inter, hidden), "w3": torch.randn(inter, hidden), "w2": torch.randn(hidden, inter)}
        _, m = pack_expert(ExpertKey(0, e), w, QuantSpec(bits, group) if bits != 16 else QuantSpec(16))
        out[ExpertKey(0, e)] = m
    return out


# -- MoE path selection ---------------------------------------------------------------------------------
@pytest.mark.skipif(not gk.HAVE_TRITON, reason="Triton not installed")
def test_cuda_u8_silu_layout_takes_the_layer_kernel() -> None:
    manifests = _manifests(2)
    path = select_path(CUDA, nn.SiLU(), manifests)
    assert path.name == "gemv_layer" and path.expert_fn is gpu_expert_ffn
    assert path.layout == gk.layout_of(next(iter(manifests.values())))
    assert select_path(CUDA, F.silu, _manifests(4)).name == "gemv_layer"
    three = select_path(CUDA, F.silu, _manifests(3))  # 3 bits as two planes: the 8-rows-per-byte GEMV
    assert three.name == "gemv_layer" and three.layout is not None and three.layout.hi_offsets
    hqq_own = select_path(CUDA, F.silu, _as_hqq_3bit_32(_manifests(3)))  # no GEMV reads it: Triton dequantize
    assert hqq_own.name == "dequant" and hqq_own.expert_fn is gpu_expert_ffn and hqq_own.layout is None
    # groups of 48: a GEMV tile's group axis must be a power of two, so the Triton dequantize + cuBLAS serves
    assert select_path(CUDA, F.silu, _manifests(2, hidden=96, inter=192, group=48)).name == "dequant"
    # K of one group: the launch shapes' K step narrows to it (gpu_kernels._fit)
    assert select_path(CUDA, F.silu, _manifests(2, hidden=64, inter=128)).name == "gemv_layer"


def _as_hqq_3bit_32(manifests: dict[ExpertKey, ExpertManifest]) -> dict[ExpertKey, ExpertManifest]:
    """The manifests as a worker storing hqq's own 3-bit packing would describe them (one int32 W_q)."""
    def matrix(m: MatrixEntry) -> MatrixEntry:
        tensors = {t: replace(e, dtype="int32") if t == "W_q" else e for t, e in m.tensors.items() if t != "W_qh"}
        return replace(m, packing="3bit_32", tensors=tensors)

    return {k: replace(m, matrices={n: matrix(x) for n, x in m.matrices.items()}) for k, m in manifests.items()}


def test_everything_else_keeps_hqq() -> None:
    two_bit = _manifests(2)
    assert select_path(torch.device("cpu"), F.silu, two_bit) is HQQ_PATH  # CPU: the exactness reference
    assert select_path(CUDA, F.gelu, two_bit) is HQQ_PATH  # the kernels fuse SiLU only
    assert select_path(CUDA, F.silu, _manifests(16)) is HQQ_PATH  # unquantized
    mixed = {**_manifests(2), ExpertKey(0, 7): next(iter(_manifests(4).values()))}
    assert select_path(CUDA, F.silu, mixed) is HQQ_PATH  # one layout must serve every arena row


# -- shared-memory registration bookkeeping ---------------------------------------------------------------
class FakeCuda:
    """Records register/unregister calls and fails, as CUDA does, on any range overlapping a registered one."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.calls: list[tuple[str, int, int]] = []

    def register(self, ptr: int, n: int) -> bool:
        self.calls.append(("reg", ptr, n))
        if any(p < ptr + n and ptr < p + m for p, m in self.live.items()):
            return False
        self.live[ptr] = n
        return True

    def unregister(self, ptr: int) -> None:
        self.calls.append(("unreg", ptr, self.live.pop(ptr)))


def test_segment_registered_once_and_views_inside_it_are_free() -> None:
    cuda = FakeCuda()
    reg = HostRegistry(cuda.register, cuda.unregister, page=4096)
    seg = 1 << 20
    assert reg.acquire(owner=1, ptr=seg, nbytes=10 * 4096)
    assert reg.acquire(owner=1, ptr=seg + 4096, nbytes=100)  # an expert inside the segment
    assert reg.acquire(owner=2, ptr=seg, nbytes=10 * 4096)  # another Transfers in the process
    assert cuda.calls == [("reg", seg, 10 * 4096)]
    reg.release(1)
    assert cuda.live == {seg: 10 * 4096}  # owner 2 still copies from it
    reg.release(2)
    assert cuda.live == {} and reg.ranges == []


def test_adjacent_experts_sharing_pages_never_overlap() -> None:
    """Per-expert views (in-process stores, Ray objects) are packed back to back and share pages."""
    cuda = FakeCuda()
    reg = HostRegistry(cuda.register, cuda.unregister, page=4096)
    base = 1 << 24
    sizes = [5000, 3000, 9000, 100]
    at = base + 100
    for i, n in enumerate(sizes):
        assert reg.acquire(owner=7, ptr=at, nbytes=n, keep=f"storage{i}")
        assert reg.covered(at, n)
        at += n
    assert reg.failed == 0
    starts = sorted(cuda.live)
    for a, b in zip(starts, starts[1:]):
        assert a + cuda.live[a] <= b  # pairwise disjoint
    assert all(p % 4096 == 0 and n % 4096 == 0 for p, n in cuda.live.items())
    assert reg.covered(base + 100, sum(sizes))
    # a later segment-wide view registers only the pages still uncovered
    before = len(cuda.live)
    assert reg.acquire(owner=8, ptr=base, nbytes=16 * 4096)
    assert len(cuda.live) == before + 1 and reg.covered(base, 16 * 4096)
    reg.release(7)
    assert len(cuda.live) == len(reg.ranges) and all(8 in r.owners for r in reg.ranges)
    reg.release(8)
    assert cuda.live == {}


def test_refused_registration_is_counted_and_retried_later() -> None:
    cuda = FakeCuda()
    cuda.live[0] = 8192  # pinned by someone else
    reg = HostRegistry(cuda.register, cuda.unregister, page=4096)
    assert not reg.acquire(owner=1, ptr=4096, nbytes=4096)
    assert reg.failed == 1 and not reg.covered(4096, 4096) and reg.ranges == []
    assert reg.acquire(owner=1, ptr=8192, nbytes=4096)
    reg.release(1)
    assert cuda.live == {0: 8192}  # never unregisters what it did not register


# -- fused q/k/v ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fused_qkv_holds_exactly_the_three_matrices(bits: int) -> None:
    """``fuse_packed`` re-packs q/k/v into one hqq matrix: its codes, scales and zeros dequantize to the three
    layers' own weights stacked, bit for bit (Mixtral-like 4:1:1 rows, hqq's axis-1 u8 packing)."""
    from hqq.core.bitpack import BitPack
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from coordinator.model import fuse_packed

    torch.manual_seed(bits)
    cfg = BaseQuantizeConfig(nbits=bits, group_size=64)
    layers = [HQQLinear(nn.Linear(256, n, bias=False), cfg, compute_dtype=torch.float32, device="cpu")
              for n in (128, 32, 32)]
    w_q, scale, zero = fuse_packed(layers)
    assert w_q.numel() == sum(m.W_q.numel() for m in layers)  # no padding: as compact as the three
    codes = getattr(BitPack, f"unpack_{bits}bit_u8")(w_q).float()[:scale.shape[0]]
    fused = ((codes - zero) * scale).reshape(192, 256)
    assert torch.equal(fused, torch.cat([m.dequantize() for m in layers]))
    other = HQQLinear(nn.Linear(128, 32, bias=False), cfg, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="input width"):
        fuse_packed([layers[0], other])


def test_fused_qkv_computes_once_per_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers calls q_proj, k_proj and v_proj on one hidden state: the fused module runs once for the
    three, gives each its rows, and runs again for a new input or a slice asked twice."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from coordinator.model import FusedQKV, PackedLinear, _Rows

    torch.manual_seed(0)
    cfg = BaseQuantizeConfig(nbits=4, group_size=64)
    layers = [HQQLinear(nn.Linear(256, n, bias=False), cfg, compute_dtype=torch.float32, device="cpu")
              for n in (128, 32, 32)]
    fused = FusedQKV([PackedLinear(m) for m in layers])
    weight = torch.cat([m.dequantize() for m in layers])
    calls: list[int] = []
    monkeypatch.setattr(FusedQKV, "forward", lambda self, x: calls.append(1) or x @ weight.T)  # no Triton on CPU
    q, k, v = (_Rows(fused, i) for i in range(3))
    x = torch.randn(1, 3, 256)
    outs = [q(x), k(x), v(x)]
    assert len(calls) == 1 and [o.shape[-1] for o in outs] == [128, 32, 32]
    for out, m in zip(outs, layers):
        assert torch.allclose(out, x @ m.dequantize().T, atol=1e-5)
    q(x), q(x)
    assert len(calls) == 3 and fused._memo is not None
    k(torch.randn(1, 3, 256))
    assert len(calls) == 4
