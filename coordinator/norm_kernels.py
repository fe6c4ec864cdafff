"""A fused RMSNorm for the graph decoder: one Triton launch instead of transformers' seven small kernels.

transformers' ``MixtralRMSNorm``: ``w * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``. A decode
segment normalizes three times per layer (input, post-attention, and the next layer's norm for the prefetch
guess), so 21 launches per layer become 3. Same arithmetic: fp32 statistics, the normalized row rounded to
x's dtype, then the weight product rounded once, as torch does for a half-precision multiply.

``FusedRMSNorm.wrap`` checks the kernel against the module on the device once and falls back to the module
(with a warning) when Triton is missing or disagrees, so a kernel problem costs speed, never correctness.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from coordinator.gpu_kernels import HAVE_TRITON, _triton_ok

log = logging.getLogger(__name__)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n, eps, BLOCK: tl.constexpr):  # noqa: ANN001 - Triton kernel
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        normed = (x * inv).to(y_ptr.dtype.element_ty).to(tl.float32)  # .to(input_dtype), as transformers
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., n] (contiguous), weight [n] of x's dtype -> [..., n]; one program per row."""
    n = x.shape[-1]
    y = torch.empty_like(x)
    rows = x.numel() // n
    _rms_norm_kernel[(rows,)](x, weight, y, n, eps, BLOCK=triton.next_power_of_2(n))
    return y


class FusedRMSNorm(nn.Module):
    """A transformers RMSNorm's weight and epsilon through ``rms_norm``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.contiguous(), self.weight, self.eps)

    @staticmethod
    def wrap(norm: nn.Module) -> nn.Module:
        """The fused norm when it runs here and matches ``norm`` on a random row; else ``norm`` itself."""
        w = norm.weight
        if not _triton_ok(w) or w.dim() != 1:
            return norm
        fused = FusedRMSNorm(norm)
        try:
            x = torch.randn(1, 1, w.shape[0], device=w.device, dtype=w.dtype)
            got, want = fused(x), norm(x)
            if got.dtype == want.dtype and torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
                return fused
            log.warning("fused RMSNorm disagrees with transformers' (max diff %.3g); using the module",
                        float((got.float() - want.float()).abs().max()))
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run costs speed, not correctness
            log.warning("fused RMSNorm unavailable (%s); using the module", e)
        return norm
