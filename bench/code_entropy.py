"""How far a lossless code could shrink the experts in transit: the entropy of hqq's 2- and 3-bit codes
(NOTES item 89), on a Gaussian matrix and on code-moe-22m's trained experts. CPU, ~20 s:

    python -m bench.code_entropy [--model ../shared/models/code-moe-22m] [--matrices 6]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

GROUP = 64


def codes(weight: torch.Tensor, bits: int, group: int = GROUP) -> np.ndarray:
    """hqq's codes of ``weight`` (round(W / scale + zero), clamped, with hqq's optimized scale and zero)."""
    from hqq.core.quantize import Quantizer

    _, meta = Quantizer.quantize(weight.float(), nbits=bits, group_size=group, axis=1, optimize=True,
                                 device="cpu")
    w = weight.float().reshape(-1, group)
    scale, zero = meta["scale"].float().reshape(-1, 1), meta["zero"].float().reshape(-1, 1)
    return torch.round(w / scale + zero).clamp(0, 2**bits - 1).to(torch.int64).flatten().numpy()


def entropy(c: np.ndarray, levels: int) -> tuple[np.ndarray, float]:
    """Each level's frequency and the Shannon entropy in bits per code."""
    p = np.bincount(c, minlength=levels) / c.size
    nz = p[p > 0]
    return p, float(-(nz * np.log2(nz)).sum())


def matrices(model: Path, count: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    out = {"Gaussian 1024 x 4096": torch.randn(1024, 4096) * 0.02}
    weights = load_file(str(model / "model.safetensors"))
    for name in [k for k in weights if "experts" in k][:count]:
        w = weights[name]
        out[name] = (w[0] if w.dim() == 3 else w).float()  # fused [E, ...] checkpoints: the first expert
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[2] / "shared/models/code-moe-22m")
    p.add_argument("--matrices", type=int, default=6)
    a = p.parse_args()
    print("| matrix | bits | level frequencies | entropy, bits a code | of the stored bits |")
    print("|---|---|---|---|---|")
    for name, w in matrices(a.model, a.matrices).items():
        for bits in (2, 3):
            freq, h = entropy(codes(w, bits), 2**bits)
            print(f"| {name} | {bits} | {' / '.join(f'{f:.3f}' for f in freq)} | {h:.3f} | {h / bits:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
