"""``python -m coordinator`` with the GPU fast paths of coordinator.gpu_kernels plugged in.

Until coordinator/ grows the hooks (see bench/NOTES.md, "Hooks"), this entry point installs them from the
outside, in the coordinator's own process, before its CLI runs:

- ``coordinator.moe.expert_ffn`` (the one swappable expert function) → ``gpu_kernels.expert_ffn_views``
  (fused Triton GEMV straight from the cache slot) for CUDA inputs of ≤ GEMV_MAX_TOKENS tokens;
- ``HQQLinear.forward_pytorch`` (4-bit attention; hqq's default backend, which ``HQQLinear.__init__``
  re-installs as ``forward`` through ``set_backend``) → ``gpu_kernels.packed_linear`` for the same inputs.
Everything else (CPU, prefill-sized batches, 3-bit) goes to the original functions. Nothing else changes:
same model shell, cache, transfers, prefetch, gRPC service.

    python -m bench.fast_coordinator serve --model CKPT --workers A,B --port 0 --gpu-memory-gb 16 ...
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from coordinator import gpu_kernels as gk

_U8 = {"2bit_u8": 2, "4bit_u8": 4, "8bit_u8": 8}


def _is_silu(act: Callable[..., Any]) -> bool:
    return act is F.silu or type(act).__name__ in ("SiLU", "SiLUActivation")


def install() -> None:
    import coordinator.moe as moe
    from hqq.core.quantize import HQQLinear

    orig_ffn = moe.expert_ffn

    def expert_ffn(slot_views: Any, manifest: Any, x: torch.Tensor, act: Callable[..., Any] = F.silu) -> torch.Tensor:
        if x.is_cuda and x.shape[0] <= gk.GEMV_MAX_TOKENS and _is_silu(act) and gk.layout_of(manifest).fused:
            return gk.expert_ffn_views(slot_views, manifest, x)
        return orig_ffn(slot_views, manifest, x, act)

    moe.expert_ffn = expert_ffn
    orig_fwd = HQQLinear.forward_pytorch

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        tokens = x.numel() // x.shape[-1]
        if (x.is_cuda and tokens <= gk.GEMV_MAX_TOKENS and meta.get("axis") == 1
                and meta.get("packing") in _U8 and not meta.get("view_as_float", False)):
            n, k = meta["shape"]
            y = gk.packed_linear(x.reshape(tokens, k), self.W_q, meta["scale"], meta["zero"], (n, k),
                                 meta["nbits"], meta["group_size"])
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], n)
        return orig_fwd(self, x)

    HQQLinear.forward_pytorch = forward
    HQQLinear.set_backend(HQQLinear.backend)   # re-point cls.forward (set_backend does this on every init too)


def main(argv: list[str] | None = None) -> int:
    install()
    from coordinator.__main__ import main as coordinator_main

    return coordinator_main(argv)


if __name__ == "__main__":
    sys.exit(main())
