"""Mixtral-8x7B-shaped random weights built directly in quantized form (no 93 GB fp16 step).

A few random expert "templates" are quantized once with hqq on the GPU (``format.pack_expert`` on CUDA
tensors) and every one of the 256 experts is a byte copy of one of them in its own memory (pageable, pinned
or device), so every transfer and every kernel reads distinct memory, as with a real checkpoint. Attention
projections are 4-bit hqq (g64), quantized once and copied per layer; embeddings, lm_head, norms and routers
are random bf16. Measured routing is skewed (hit rates above k/8): see bench/NOTES.md.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from expert_workers.format import ExpertKey, ExpertManifest, QuantSpec, _quantize_matrix, pack_expert


@dataclass(frozen=True)
class ModelShape:
    """Shapes of the benchmarked model."""

    hidden: int = 4096
    """H."""
    layers: int = 32
    """Decoder layers."""
    experts: int = 8
    """Experts per layer."""
    inter: int = 14336
    """Expert FFN width I."""
    heads: int = 32
    """Query heads."""
    kv_heads: int = 8
    """Key/value heads (GQA)."""
    vocab: int = 32000
    """Vocabulary."""
    top_k: int = 2
    """Experts per token."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


MIXTRAL_8X7B = ModelShape()
SMALL = ModelShape(hidden=512, layers=4, experts=8, inter=1024, heads=8, kv_heads=2, vocab=1000)
"""A quick GPU smoke run of the bench code."""
TINY = ModelShape(hidden=128, layers=2, experts=4, inter=256, heads=2, kv_heads=1, vocab=256)
"""CPU smoke runs through Triton's interpreter (TRITON_INTERPRET=1)."""


@dataclass
class ExpertBank:
    """All experts of the model in host memory: one row per expert (idx = layer·E + expert)."""

    host: torch.Tensor
    """uint8 [L·E, slot_bytes], pinned or pageable."""
    manifests: list[ExpertManifest]
    """Manifest of each row (same layout, own key)."""
    spec: QuantSpec
    """How the experts are quantized."""

    @property
    def slot_bytes(self) -> int:
        return self.host.shape[1]

    @property
    def expert_bytes(self) -> int:
        return self.manifests[0].nbytes


def expert_templates(shape: ModelShape, spec: QuantSpec, n: int, device: str, seed: int = 0
                     ) -> list[tuple[np.ndarray, ExpertManifest]]:
    """``n`` random experts quantized (on ``device``) and packed; weights ~ N(0, 1/fan_in)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for t in range(n):
        h, i = shape.hidden, shape.inter
        w = {"w1": torch.randn(i, h, generator=gen, device=device, dtype=torch.float16) / h ** 0.5,
             "w3": torch.randn(i, h, generator=gen, device=device, dtype=torch.float16) / h ** 0.5,
             "w2": torch.randn(h, i, generator=gen, device=device, dtype=torch.float16) / i ** 0.5}
        out.append(pack_expert(ExpertKey(0, t), w, spec, fingerprint=f"bench-synthetic-{spec.bits}b"))
        del w
    return out


def build_bank(shape: ModelShape, templates: list[tuple[np.ndarray, ExpertManifest]], pinned: bool
               ) -> ExpertBank:
    """Every expert a copy of template (idx mod T), in one pinned or pageable host tensor."""
    n = shape.layers * shape.experts
    nbytes = templates[0][1].nbytes
    slot = (nbytes + 4095) // 4096 * 4096
    host = torch.empty((n, slot), dtype=torch.uint8, pin_memory=pinned)
    tpl = [torch.from_numpy(b) for b, _ in templates]
    manifests = []
    for idx in range(n):
        host[idx, :nbytes].copy_(tpl[idx % len(tpl)])
        layer, e = divmod(idx, shape.experts)
        manifests.append(dataclasses.replace(templates[idx % len(tpl)][1], key=ExpertKey(layer, e)))
    return ExpertBank(host=host, manifests=manifests, spec=spec_of(templates))


def spec_of(templates: list[tuple[np.ndarray, ExpertManifest]]) -> QuantSpec:
    """The QuantSpec the templates were packed with (bits, group size, meta bits)."""
    w1 = templates[0][1].matrices["w1"]
    return QuantSpec(bits=w1.bits, group_size=w1.group_size or 64, meta_bits=w1.meta_bits)


@dataclass
class PackedMatrix:
    """One hqq-quantized projection on the device (axis=1, u8 packing)."""

    w_q: torch.Tensor
    """Packed weights."""
    scale: torch.Tensor
    """fp16 [groups]."""
    zero: torch.Tensor
    """fp16 [groups]."""
    shape: tuple[int, int]
    """[out, in]."""
    bits: int
    """Bits."""
    group_size: int
    """Group size."""

    def clone(self) -> PackedMatrix:
        return dataclasses.replace(self, w_q=self.w_q.clone(), scale=self.scale.clone(), zero=self.zero.clone())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_q, self.scale, self.zero))


def quantized_random(out: int, inp: int, bits: int, device: str, seed: int) -> PackedMatrix:
    """A random [out, in] matrix quantized by hqq on the device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, device=device, dtype=torch.float16) / inp ** 0.5
    t, _meta = _quantize_matrix(w, QuantSpec(bits=bits, group_size=64))
    return PackedMatrix(t["W_q"], t["scale"].reshape(-1), t["zero"].reshape(-1), (out, inp), bits, 64)


@dataclass
class DenseWeights:
    """Everything but the experts, on the device."""

    embed: torch.Tensor
    """[V, H] bf16."""
    lm_head: torch.Tensor
    """[V, H] bf16."""
    final_norm: torch.Tensor
    """[H]."""
    attn_norm: list[torch.Tensor]
    """Per layer [H]."""
    ffn_norm: list[torch.Tensor]
    """Per layer [H]."""
    qkv: list[PackedMatrix]
    """Per layer fused q/k/v projection [(heads + 2·kv_heads)·head_dim, H], 4-bit."""
    o: list[PackedMatrix]
    """Per layer output projection [H, H], 4-bit."""
    router: list[torch.Tensor]
    """Per layer [E, H] bf16."""


def build_dense(shape: ModelShape, device: str, attn_bits: int = 4, seed: int = 1,
                dtype: torch.dtype = torch.bfloat16) -> DenseWeights:
    """Random non-expert weights; attention quantized once and copied per layer."""
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    h, d = shape.hidden, shape.head_dim
    qkv = quantized_random((shape.heads + 2 * shape.kv_heads) * d, h, attn_bits, device, seed)
    o = quantized_random(h, shape.heads * d, attn_bits, device, seed + 1)

    def rnd(*s: int, scale: float) -> torch.Tensor:
        return (torch.randn(*s, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    ones = torch.ones(h, device=device, dtype=dtype)
    dense = DenseWeights(
        embed=rnd(shape.vocab, h, scale=1.0), lm_head=rnd(shape.vocab, h, scale=h ** -0.5),
        final_norm=ones.clone(), attn_norm=[ones.clone() for _ in range(shape.layers)],
        ffn_norm=[ones.clone() for _ in range(shape.layers)],
        qkv=[qkv.clone() for _ in range(shape.layers)], o=[o.clone() for _ in range(shape.layers)],
        router=[rnd(shape.experts, h, scale=h ** -0.5) for _ in range(shape.layers)])
    del qkv, o
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"dense weights built in {time.perf_counter() - t0:.1f}s", flush=True)
    return dense
