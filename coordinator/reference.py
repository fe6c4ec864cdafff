"""The correctness reference: transformers' own ``MixtralForCausalLM`` on exactly the weights the coordinator
computes with, so greedy tokens must match ours token for token.

- experts: each expert's w1/w3/w2 dequantized from the workers' packed buffers (hqq's own dequantize), or the
  checkpoint's weights at ``--expert-bits 16``;
- attention: q/k/v/o through hqq quantize -> dequantize with the coordinator's settings (``attn_bits`` < 16),
  and lm_head likewise (``lm_head_bits`` < 16);
- dtype: the coordinator's rule (``model.compute_dtype``): float32 on CPU, the checkpoint's dtype on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from coordinator.model import ATTN_PROJ, compute_dtype
from expert_workers.format import ExpertKey, dequantize_matrix
from expert_workers.source import ExpertSource


def expert_weights(source: ExpertSource, key: ExpertKey) -> dict[str, torch.Tensor]:
    """One expert's w1/w3/w2 as the source serves them, dequantized ([out, in], the compute dtype)."""
    buf = torch.empty(source.manifest(key).nbytes, dtype=torch.uint8)
    manifest = source.fetch_into(key, buf)
    return {name: dequantize_matrix(buf, manifest, name) for name in ("w1", "w3", "w2")}


@torch.no_grad()
def load_experts_from(model: MixtralForCausalLM, source: ExpertSource) -> None:
    """Overwrites every expert of ``model`` with the (dequantized) expert the source serves."""
    for layer_idx, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        for e in range(experts.num_experts):
            w = expert_weights(source, ExpertKey(layer_idx, e))
            dtype = experts.gate_up_proj.dtype
            experts.gate_up_proj[e].copy_(torch.cat([w["w1"], w["w3"]], dim=0).to(dtype))
            experts.down_proj[e].copy_(w["w2"].to(dtype))


@torch.no_grad()
def quantize_attention_like_coordinator(model: MixtralForCausalLM, bits: int, group_size: int = 64) -> None:
    """Replaces q/k/v/o weights by hqq's quantize -> dequantize, as ``HQQLinear`` holds them."""
    if bits == 16:
        return
    for layer in model.model.layers:
        for proj in ATTN_PROJ:
            _round_trip(getattr(layer.self_attn, proj), bits, group_size)


@torch.no_grad()
def _round_trip(linear: torch.nn.Linear, bits: int, group_size: int) -> None:
    """``linear.weight`` replaced in place by hqq's quantize -> dequantize of it, as ``HQQLinear`` holds it."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    weight = linear.weight
    copy = torch.nn.Linear(linear.in_features, linear.out_features, bias=False,
                           device=weight.device, dtype=weight.dtype)
    copy.weight.copy_(weight)
    hqq = HQQLinear(copy, BaseQuantizeConfig(nbits=bits, group_size=group_size), compute_dtype=weight.dtype,
                    device=str(weight.device))
    weight.copy_(hqq.dequantize())


def reference_model(ckpt: Path, source: ExpertSource | None = None, attn_bits: int = 16,
                    device: str = "cpu", attn_group_size: int = 64,
                    experts_implementation: str | None = None, lm_head_bits: int = 16) -> MixtralForCausalLM:
    """transformers' Mixtral on the coordinator's weights (``source`` None: the checkpoint's experts).
    ``experts_implementation`` None keeps transformers' default (grouped_mm where it applies); ``lm_head_bits``
    < 16 round-trips lm_head through hqq as ``CoordinatorConfig.lm_head_bits`` does (untied lm_head only)."""
    dev = torch.device(device)
    dtype = compute_dtype(MixtralConfig.from_pretrained(ckpt), dev)
    model = MixtralForCausalLM.from_pretrained(ckpt, dtype=dtype).to(dev)
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    if source is not None:
        load_experts_from(model, source)
    quantize_attention_like_coordinator(model, attn_bits, attn_group_size)
    if lm_head_bits < 16:
        _round_trip(model.lm_head, lm_head_bits, attn_group_size)
    return model.eval()


def greedy(model: MixtralForCausalLM, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """``generate(do_sample=False)``'s new tokens (EOS included when it stops there)."""
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([prompt_ids], device=device), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()
