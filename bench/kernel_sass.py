"""The expert GEMV kernels compiled for a GPU on a machine without one: do they build, and what do they cost in
instructions? (CPU, ~1 min; NOTES item 86.)

    .venv/bin/python -m bench.kernel_sass [--arch 90] [--out bench/results/<date>-cpu-kernel-sass.md]

Triton compiles ahead of time for any target with its bundled ptxas, so the decode kernels (gate-up and down,
2-bit u8 and 3-bit planes, by words, at Mixtral's shapes and the launch shapes of ``coordinator.gpu_kernels``)
are built here for sm_``arch`` with fp16 scales/zeros and with 8-bit tables (``META8``). For each, the SASS
(``cuobjdump -sass``) gives the static instruction count, the global loads, the stores that spill registers to
local memory, and the registers a thread needs:
a proxy for what ``META8`` adds to a kernel that is bound by instructions (NOTES item 50), not a timing. This
machine's Triton may differ from the GPU machine's (3.6 there), so the code it emits may differ too.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cache_bound import emit

H, I, G = 4096, 14336, 64
"""Mixtral's hidden and FFN sizes, hqq's group."""


def compile_for(fn: Any, sig: dict[str, str], const: dict[str, Any], cfg: Any, arch: int) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    src = ASTSource(fn=fn, signature=sig | {k: "constexpr" for k in const},
                    constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                   "enable_fp_fusion": True})   # as the GPU machine's Triton 3.6 compiles


def _sass_stats(kernel: Any) -> dict[str, int]:
    """Instructions, global loads (LDG) and registers of a compiled kernel, from cuobjdump's SASS."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    regs = re.search(r"REG:(\d+)", usage)
    return {"instructions": len(ops), "global loads": sum(op.startswith("LDG") for op in ops),
            "spill stores": sum(op.startswith("STL") for op in ops), "registers": int(regs.group(1)) if regs else -1}


def kernels(meta8: bool) -> list[tuple[str, Any, dict[str, str], dict[str, Any], Any]]:
    import triton.language as tl

    from coordinator import gpu_kernels as gk
    from coordinator import planes3

    ptrs = {"x_ptr": "*bf16", "base_ptr": "*u8", "slots_ptr": "*i32", "slot_stride": "i32", "h_ptr": "*fp32",
            "zero_ptr": "*fp32", "zero_n": "i32"}
    down = {"h_ptr": "*fp32", "base_ptr": "*u8", "slots_ptr": "*i32", "slot_stride": "i32", "w_ptr": "*fp32",
            "y_ptr": "*fp32"}
    off = {f"O{t}{m}": (i + 1) * 2 ** 20 for i, (m, t) in enumerate((m, t) for m in "13" for t in "QSZH")}
    common = {"H": H, "I": I, "GROUP": G, "TOPK": 2, "INDIRECT": True, "WDT": tl.float16, "META8": meta8}
    gu3, dn3 = (gk.GATE_UP3_M8, gk.DOWN3_M8) if meta8 else (gk.GATE_UP3, gk.DOWN3)   # as gk.configs_for picks
    out = []
    for name, fn, cfg, sig, extra in (
            ("2-bit gate-up", gk._gate_up_kernel, gk.GATE_UP, ptrs, {"BITS": 2, "ZERO_OUT": True}),
            ("2-bit down", gk._down_kernel, gk.DOWN, down, {"BITS": 2, "SPLIT_K": gk.DOWN.split_k}),
            ("3-bit gate-up", planes3._gate_up_kernel, gu3, ptrs, {"ZERO_OUT": True}),
            ("3-bit down", planes3._down_kernel, dn3, down, {"SPLIT_K": dn3.split_k})):
        names = set(fn.arg_names)
        offsets = {k: v for k, v in off.items() if k in names}
        if "OQ" in names:  # the down kernels: one matrix (w2)
            offsets = {k: v for k, v in {"OQ": 2 ** 20, "OS": 2 ** 21, "OZ": 2 ** 22, "OH": 2 ** 23}.items()
                       if k in names}
        const = common | extra | offsets | {"BN": cfg.block_n, "GPB": cfg.groups_per_block, "WORDS": True}
        out.append((name, fn, sig, {k: v for k, v in const.items() if k in names}, cfg))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--sweep3", action="store_true", help="also the 3-bit gate-up kernel at other launch shapes")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import triton

    t0 = time.perf_counter()
    lines = [f"# Expert GEMV kernels compiled for sm_{a.arch} without a GPU (Triton {triton.__version__})", "",
             f"`python -m bench.kernel_sass --arch {a.arch}{' --sweep3' if a.sweep3 else ''}`", "",
             "| kernel | scales/zeros | SASS instructions | global loads | spill stores (STL) | registers |",
             "|---|---|---|---|---|---|"]
    for meta8 in (False, True):
        for name, fn, sig, const, cfg in kernels(meta8):
            s = _sass_stats(compile_for(fn, sig, const, cfg, a.arch))
            lines.append(f"| {name} | {'8-bit tables' if meta8 else 'fp16'} | {s['instructions']} | "
                         f"{s['global loads']} | {s['spill stores']} | {s['registers']} |")
            print(lines[-1], flush=True)
    if a.sweep3:
        lines += _sweep3(a.arch)
    emit(lines + ["", f"Ran in {time.perf_counter() - t0:.0f} s."], a.out)


SHAPES3 = ((4, 8, 4), (4, 4, 4), (8, 4, 4), (2, 8, 4), (4, 8, 8))
"""(block_n, groups_per_block, num_warps) of the 3-bit gate-up kernel for ``--sweep3``; the first is GATE_UP3."""


def _sweep3(arch: int) -> list[str]:
    """Spill stores and instructions of the 3-bit gate-up kernel at SHAPES3, fp16 meta and tables."""
    import dataclasses

    out = ["", "3-bit gate-up at other launch shapes (spill stores / instructions):", "",
           "| block_n | groups_per_block | warps | fp16 | 8-bit tables |", "|---|---|---|---|---|"]
    for bn, gpb, warps in SHAPES3:
        cells = []
        for meta8 in (False, True):
            _, fn, sig, const, cfg = kernels(meta8)[2]
            s = _sass_stats(compile_for(fn, sig, const | {"BN": bn, "GPB": gpb}, dataclasses.replace(
                cfg, block_n=bn, groups_per_block=gpb, num_warps=warps), arch))
            cells.append(f"{s['spill stores']} / {s['instructions']}")
        out.append(f"| {bn} | {gpb} | {warps} | {cells[0]} | {cells[1]} |")
        print(out[-1], flush=True)
    return out


if __name__ == "__main__":
    main()
