"""The model shell: transformers' own Mixtral with every expert left out.

``MixtralForCausalLM`` is built on the meta device, then only the non-expert weights are read from the
checkpoint onto the compute device: embeddings, attention q/k/v/o, norms, routers and lm_head (tied to the
embeddings when the config says so). The experts' fused parameters are deleted, never materialized; the
MoE block's experts call goes to ``coordinator.moe`` through transformers' experts-implementation registry.
Attention projections, and an untied lm_head, are optionally replaced by hqq's ``HQQLinear`` (4 or 8 bits);
everything else stays in the compute dtype.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from coordinator.config import ATTN_BITS
from coordinator.host_embedding import host_embeddings_apply, move_embeddings_to_host

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class ShellSpec:
    """How the non-expert part of the model is placed and quantized."""

    device: str = "cpu"
    """torch device for every non-expert weight, the KV cache and the expert cache."""
    attn_bits: int = 4
    """hqq bits for attention q/k/v/o: 4, 8, or 16 (kept as in the checkpoint)."""
    attn_group_size: int = 64
    """hqq group size for attention weights."""
    host_embeddings: bool = True
    """Token embedding table in pinned host memory where that applies (CUDA, untied lm_head:
    ``coordinator.host_embedding``), as ``CoordinatorConfig.host_embeddings``."""
    lm_head_bits: int = 16
    """hqq bits for lm_head (group size ``attn_group_size``): 4, 8, or 16 (kept as in the checkpoint)."""


def compute_dtype(config: MixtralConfig, device: torch.device) -> torch.dtype:
    """The checkpoint's dtype on CUDA; float32 on CPU, where half-precision matmuls are slow and not what the
    reference runs. Exactness tests load the transformers reference with the same rule."""
    if device.type != "cuda":
        return torch.float32
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def checkpoint_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (from its index when there is one)."""
    index = ckpt / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [ckpt / n for n in names]
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no *.safetensors files")
    return files


def is_expert_tensor(name: str) -> bool:
    """Expert weights in either layout: ``block_sparse_moe.experts.E.w1.weight`` or ``mlp.experts.*``."""
    return ".experts." in name


def shell_name(name: str) -> str:
    """Checkpoint tensor name -> parameter name in transformers 5's Mixtral (routers live in ``mlp.gate``)."""
    return name.replace(".block_sparse_moe.gate.", ".mlp.gate.")


def load_non_expert_weights(ckpt: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Reads every non-expert tensor straight onto ``device`` in ``dtype``; expert tensors are never read."""
    out: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(ckpt):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if not is_expert_tensor(name):
                    out[shell_name(name)] = f.get_tensor(name).to(device=device, dtype=dtype)
    return out


def _build_on_meta(config: MixtralConfig) -> MixtralForCausalLM:
    with torch.device("meta"):
        return MixtralForCausalLM(config)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def _drop_expert_parameters(model: MixtralForCausalLM) -> None:
    """Removes the fused expert parameters (still on meta) so nothing can use or move them."""
    for layer_idx, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        for pname in list(experts._parameters):
            del experts._parameters[pname]
        experts.layer_idx = layer_idx


def _fix_buffers(model: MixtralForCausalLM, config: MixtralConfig, device: torch.device) -> None:
    """Non-persistent buffers (rotary inverse frequencies) were created on meta: rebuild them on device."""
    rotary_cls = type(model.model.rotary_emb)
    with torch.device(device):
        model.model.rotary_emb = rotary_cls(config=config)


class PackedLinear(nn.Module):
    """An ``HQQLinear`` whose decode-sized calls (≤ ``GEMV_MAX_TOKENS`` tokens) run the Triton GEMV straight from
    its packed ``W_q`` (``gpu_kernels.packed_linear``: 0.015 ms graphed for Mixtral's qkv at 4 bits against hqq's
    dequantize + matmul); larger calls (prefill) go to hqq. Used on CUDA only, for u8 packings the kernel
    reads; the CPU keeps plain HQQLinear, which the exactness tests compare against hqq's reference."""

    def __init__(self, hqq: nn.Module) -> None:
        super().__init__()
        self.hqq = hqq
        meta = hqq.meta
        self.out_features, self.in_features = meta["shape"]
        self.bits, self.group_size = meta["nbits"], meta["group_size"]

    @staticmethod
    def supports(hqq: nn.Module) -> bool:
        """Whether the GEMV kernel reads this layer's layout (axis 1, u8 packing, kernel's K step)."""
        from coordinator import gpu_kernels as gk

        meta = hqq.meta
        if not (gk.HAVE_TRITON and hqq.W_q.is_cuda and meta.get("axis") == 1
                and meta.get("packing") in ("2bit_u8", "4bit_u8", "8bit_u8") and not meta.get("view_as_float")):
            return False
        n, k = meta["shape"]   # whole groups along K (gpu_kernels._fit narrows the K step)
        g = meta["group_size"]
        return n % (8 // meta["nbits"]) == 0 and k % g == 0 and gk.group_tiles(g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        from coordinator import gpu_kernels as gk

        if tokens > gk.GEMV_MAX_TOKENS:
            return self.hqq(x)
        meta = self.hqq.meta
        y = gk.packed_linear(x.reshape(tokens, self.in_features), self.hqq.W_q, meta["scale"], meta["zero"],
                             (self.out_features, self.in_features), self.bits, self.group_size)
        if self.hqq.bias is not None:
            y = y + self.hqq.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def fuse_packed(layers: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hqq layers (axis 1, one u8 packing, same input width and group size) as one packed matrix whose output
    rows are theirs, concatenated: (W_q, scale, zero), exactly their integer codes, scales and zeros. hqq packs
    group row r with row r + R/V of the same matrix, so the codes are unpacked, stacked and packed again
    (scales and zeros are per group row, n-major: they simply stack)."""
    from hqq.core.bitpack import BitPack

    if len({(m.meta["packing"], m.meta["group_size"], m.meta["shape"][1]) for m in layers}) != 1:
        raise ValueError("only layers with one packing, group size and input width fuse")
    packing = layers[0].meta["packing"]
    unpack, pack = getattr(BitPack, f"unpack_{packing}"), getattr(BitPack, f"pack_{packing}")
    codes = torch.cat([unpack(m.W_q)[:m.meta["scale"].shape[0]] for m in layers])  # [R total, group]
    return (pack(codes), torch.cat([m.meta["scale"] for m in layers]), torch.cat([m.meta["zero"] for m in layers]))


class FusedQKV(nn.Module):
    """q/k/v of one attention layer as one packed matrix (``fuse_packed``): a decode step runs one GEMV for
    the three (``coordinator.decode``). Mixtral's k/v have 1024 outputs, too few rows to fill the H200, so
    three launches cost ~2x one. transformers' attention keeps calling ``q_proj`` / ``k_proj`` / ``v_proj``,
    now ``_Rows`` slices of this module: the first of them computes, the other two reuse the result. The
    separate packed matrices are dropped, so the fusion costs no memory."""

    def __init__(self, layers: list[PackedLinear]) -> None:
        super().__init__()
        w_q, scale, zero = fuse_packed([p.hqq for p in layers])
        self.register_buffer("w_q", w_q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bits, self.group_size, self.in_features = layers[0].bits, layers[0].group_size, layers[0].in_features
        self.splits = [p.out_features for p in layers]
        self.out_features = sum(self.splits)
        self._memo: tuple[torch.Tensor, torch.Tensor, set[int]] | None = None  # (x, forward(x), slices not taken)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., q + k + v]: the GEMV for decode-sized calls, dequantize + matmul above."""
        from coordinator import gpu_kernels as gk

        tokens = x.numel() // x.shape[-1]
        flat = x.reshape(tokens, self.in_features)
        if tokens <= gk.GEMV_MAX_TOKENS:
            y = gk.packed_linear(flat, self.w_q, self.scale, self.zero, (self.out_features, self.in_features),
                                 self.bits, self.group_size)
        else:
            w = gk.dequantize(self.w_q, self.scale, self.zero, (self.out_features, self.in_features), self.bits,
                              self.group_size, f"{self.bits}bit_u8", x.dtype)
            y = flat @ w.T
        return y.reshape(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Output ``index`` (0 q, 1 k, 2 v) of ``forward(x)``, computed once for the three calls on one x."""
        memo = self._memo
        if memo is None or memo[0] is not x or index not in memo[2]:  # a new x, or this slice taken already
            memo = (x, self(x), set(range(len(self.splits))))
        memo[2].discard(index)
        self._memo = memo if memo[2] else None  # the last slice drops the references
        lo = sum(self.splits[:index])
        return memo[1][..., lo:lo + self.splits[index]]


class _Rows(nn.Module):
    """``q_proj`` / ``k_proj`` / ``v_proj`` of a fused attention layer."""

    def __init__(self, fused: FusedQKV, index: int) -> None:
        super().__init__()
        self.index, self.out_features, self.in_features = index, fused.splits[index], fused.in_features
        self.__dict__["fused"] = fused  # not a submodule: the attention module owns it once, as ``qkv_proj``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.rows(x, self.index)


FUSE_QKV = True
"""Fuse q/k/v where they allow it (tests turn it off to build hqq's reference paths)."""


def _fuse_qkv(attn: nn.Module) -> None:
    """Fuses q/k/v when all three are ``PackedLinear`` with one layout and no bias."""
    if not FUSE_QKV:
        return
    projs = [getattr(attn, p) for p in ATTN_PROJ[:3]]
    if not all(isinstance(p, PackedLinear) and p.hqq.bias is None for p in projs):
        return
    metas = [(p.bits, p.group_size, p.in_features, p.hqq.meta["packing"]) for p in projs]
    if len(set(metas)) != 1:
        return
    attn.qkv_proj = FusedQKV(projs)
    for i, name in enumerate(ATTN_PROJ[:3]):
        setattr(attn, name, _Rows(attn.qkv_proj, i))


def _quantize_attention(model: MixtralForCausalLM, spec: ShellSpec, dtype: torch.dtype) -> None:
    """Replaces q/k/v/o with hqq's HQQLinear (axis 1, ``attn_group_size``) when ``attn_bits`` < 16; on CUDA,
    wrapped in ``PackedLinear`` where the GEMV kernel reads the layout (chosen once, here)."""
    if spec.attn_bits == 16:
        return
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in ATTN_PROJ:
            linear = getattr(attn, proj)
            if linear.in_features % spec.attn_group_size:
                raise ValueError(f"attention {proj} input dim {linear.in_features} is not divisible by "
                                 f"group size {spec.attn_group_size}")
            setattr(attn, proj, _hqq_layer(linear, spec.attn_bits, spec.attn_group_size, dtype))
        _fuse_qkv(attn)


def _hqq_layer(linear: nn.Linear, bits: int, group_size: int, dtype: torch.dtype) -> nn.Module:
    """``linear`` quantized by hqq's HQQLinear (axis 1), wrapped in ``PackedLinear`` where the GEMV reads it."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    hqq = HQQLinear(linear, BaseQuantizeConfig(nbits=bits, group_size=group_size), compute_dtype=dtype,
                    device=str(linear.weight.device))
    return PackedLinear(hqq) if PackedLinear.supports(hqq) else hqq


def _quantize_lm_head(model: MixtralForCausalLM, spec: ShellSpec, dtype: torch.dtype) -> None:
    """Replaces lm_head with hqq's HQQLinear (as attention: axis 1, ``attn_group_size``; ``PackedLinear`` where
    the GEMV reads it) when ``lm_head_bits`` < 16. Mixtral's [32000, 4096] takes 262 MB in bf16 and 74 MB at
    4 bits: the difference buys three more 2-bit expert slots at any memory cap. A tied lm_head is the
    embedding table itself, which would then be held twice: refused."""
    if spec.lm_head_bits == 16:
        return
    if model.config.tie_word_embeddings:
        raise ValueError("lm_head shares the embedding table (tie_word_embeddings): quantizing it would keep "
                         "the table twice; use lm_head_bits=16 for this model")
    rows, cols, group = model.lm_head.out_features, model.lm_head.in_features, spec.attn_group_size
    per_byte = 8 // spec.lm_head_bits  # hqq packs that many group rows into one byte row
    if cols % group or (rows * cols // group) % per_byte:
        raise ValueError(f"lm_head [{rows}, {cols}] does not pack at {spec.lm_head_bits} bits in groups of "
                         f"{group}: the input dim must divide by {group} and the groups by {per_byte} (an odd "
                         f"vocabulary needs lm_head_bits 8 or 16)")
    model.lm_head = _hqq_layer(model.lm_head, spec.lm_head_bits, group, dtype)


def build_shell(ckpt: Path, spec: ShellSpec) -> MixtralForCausalLM:
    """Mixtral with non-expert weights on ``spec.device`` and no experts; call ``moe.attach`` next."""
    for what, bits in (("attention", spec.attn_bits), ("lm_head", spec.lm_head_bits)):
        if bits not in ATTN_BITS:
            raise ValueError(f"{what} bits must be one of {ATTN_BITS}, got {bits}")
    config = MixtralConfig.from_pretrained(ckpt)
    device = torch.device(spec.device)
    dtype = compute_dtype(config, device)
    config._attn_implementation = "sdpa"  # what from_pretrained picks by default: the exactness reference
    model = _build_on_meta(config)
    weights = load_non_expert_weights(ckpt, device, dtype)
    expected = {n for n, _ in model.named_parameters() if not is_expert_tensor(n)}
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        weights.pop("lm_head.weight", None)
    missing = expected - weights.keys()
    if missing:
        raise ValueError(f"checkpoint {ckpt} lacks non-expert tensors: {sorted(missing)[:5]}")
    for name in expected:
        _assign(model, name, weights[name])
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _drop_expert_parameters(model)
    _fix_buffers(model, config, device)
    _quantize_attention(model, spec, dtype)
    _quantize_lm_head(model, spec, dtype)
    if spec.host_embeddings and host_embeddings_apply(model, device):
        move_embeddings_to_host(model)
    model.eval()
    return model


def non_expert_bytes(model: nn.Module) -> int:
    """Bytes held on the device by the shell (parameters, buffers, hqq packed weights)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    from hqq.core.quantize import HQQLinear

    for m in model.modules():
        if isinstance(m, HQQLinear):  # W_q may be a parameter (counted above); scale/zero live in meta
            for t in [m.W_q, *(v for v in m.meta.values() if isinstance(v, torch.Tensor))]:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def cache_kwarg() -> str:
    """transformers 5.24 calls the KV cache argument ``cache`` (``past_key_values`` deprecated); 5.17 has
    only ``past_key_values``."""
    params = inspect.signature(MixtralForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
