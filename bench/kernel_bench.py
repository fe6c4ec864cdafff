"""One Mixtral expert FFN (H=4096, I=14336) at batch 1 on the GPU: correctness and time of every path.

Paths: bf16 dense (floor of the unquantized model), hqq's PyTorch dequantize + matmul, gemlite A16Wn built
from our hqq views (its repack cost too), our Triton GEMV per expert and for a layer's 2 experts (eager and
CUDA-graphed), a small launch-shape sweep, and the 3-bit fallback (Triton dequantize + cuBLAS). Timings are
medians of CUDA-event timed runs rotating over distinct expert buffers (more than the 60 MB L2).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.synth import ModelShape
from coordinator import dequant_ffn
from coordinator import gpu_kernels as gk
from expert_workers.format import ExpertManifest, dequantize_matrix, meta_of, tensor_views


def timeit(fn: Callable[[int], Any], n_rot: int, reps: int = 50, warmup: int = 5) -> float:
    """Median ms of fn(i) over reps calls (i rotates over n_rot inputs), each timed with CUDA events."""
    for i in range(warmup):
        fn(i % n_rot)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i % n_rot)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_time(fn: Callable[[], Any], reps: int = 50) -> float:
    """Median ms of a CUDA-graph replay of fn (captured after a warm-up on a side stream)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return timeit(lambda i: g.replay(), 1, reps)


def reference(x: torch.Tensor, buf: torch.Tensor, man: ExpertManifest) -> torch.Tensor:
    """hqq's own dequantize, then the FFN in fp32."""
    w1, w3, w2 = (dequantize_matrix(buf, man, n).float() for n in ("w1", "w3", "w2"))
    xf = x.float()
    return F.linear(F.silu(F.linear(xf, w1)) * F.linear(xf, w3), w2)


def hqq_ffn(x: torch.Tensor, buf: torch.Tensor, man: ExpertManifest) -> torch.Tensor:
    """hqq's PyTorch backend: dequantize each matrix (fp16), then fp16 matmuls."""
    w1, w3, w2 = (dequantize_matrix(buf, man, n) for n in ("w1", "w3", "w2"))
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _gemlite_expert(buf: torch.Tensor, man: ExpertManifest) -> tuple[list[Any], float]:
    """gemlite A16Wn layers for w1/w3/w2 built from our views; returns them and the build time (ms)."""
    from gemlite.helper import A16Wn
    from hqq.core.quantize import Quantizer

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    views = tensor_views(buf, man)
    layers = []
    for name in ("w1", "w3", "w2"):
        m = man.matrices[name]
        v = views[name]
        scale, zero = meta_of(m, v)   # gemlite takes fp16 scales and zeros: 8-bit tables decoded
        w_q = Quantizer.unpack[m.packing](v["W_q"], dtype=torch.uint8).view(m.shape)   # gemlite repacks over K
        layers.append(A16Wn(device=str(buf.device)).from_weights(
            w_q, scale.view(m.shape[0], -1), zero.view(m.shape[0], -1), W_nbits=m.bits,
            group_size=m.group_size))
    torch.cuda.synchronize()
    return layers, (time.perf_counter() - t0) * 1e3


def run(shape: ModelShape, tpl2: list[tuple[np.ndarray, ExpertManifest]],
        tpl3: list[tuple[np.ndarray, ExpertManifest]] | None, device: str, log: Callable[[str], None]
        ) -> dict[str, Any]:
    """Every 2-bit path's error against hqq, then its time (one expert and a layer's two, batch 1), the
    launch-shape sweeps whose winners are installed for the runs after them, gemlite, the 4-bit attention
    projection; then the 3-bit paths (``run3``)."""
    res: dict[str, Any] = {}
    man = tpl2[0][1]
    lay = gk.layout_of(man)
    nrot = 8                                                         # 8 × 55 MB ≫ 60 MB L2
    bufs = [torch.from_numpy(tpl2[i % len(tpl2)][0]).to(device) for i in range(nrot)]
    slab = torch.stack([torch.nn.functional.pad(b, (0, (-b.numel()) % 4096)) for b in bufs])
    res["rel_err_vs_hqq"] = _errors(shape.hidden, bufs, slab, man, lay, device)
    log(f"kernel rel error vs hqq dequantize+matmul: {res['rel_err_vs_hqq']}")
    x = torch.randn(1, shape.hidden, device=device, dtype=torch.float16)   # timings: batch 1, fp16 activations
    t: dict[str, float] = {}
    best_t = _expert_timings(x, shape.inter, bufs, slab, man, lay, t, res, log)
    _gemlite_timing(x, bufs, man, t, res, log)
    _linear4_timing(shape.hidden, device, t, res, log)
    if tpl3:
        res["bits3"] = run3(shape, tpl3, device, log)
    res["ms"] = t
    res["expert_bytes_2bit"] = man.nbytes
    res["effective_GBps_2experts_graph"] = 2 * man.nbytes / (best_t * 1e-3) / 1e9
    del bufs, slab
    torch.cuda.empty_cache()
    return res


def _errors(H: int, bufs: list[torch.Tensor], slab: torch.Tensor, man: ExpertManifest, lay: gk.PackedLayout,
            device: str) -> dict[str, float]:
    """Worst relative error against hqq's dequantize + matmul of one expert (batch 1 and 3) and of a layer's
    two, per activation dtype, over fresh random inputs."""
    errs: dict[str, list[float]] = {}
    nrot = len(bufs)
    for dt in (torch.float16, torch.bfloat16):
        for trial in range(3):
            x = torch.randn(1, H, device=device, dtype=dt)
            j = trial % nrot
            ref = reference(x, bufs[j], man)
            y1 = gk.expert_ffn(x, bufs[j], man)
            slots = torch.tensor([[j, (j + 1) % nrot]], device=device, dtype=torch.int32)
            w = torch.tensor([[0.6, 0.4]], device=device)
            ref2 = 0.6 * ref + 0.4 * reference(x, bufs[(j + 1) % nrot], man)
            y2 = gk.moe_ffn(x, slab, slots, w, lay)
            x4 = torch.randn(3, H, device=device, dtype=dt)
            y4 = gk.expert_ffn(x4, bufs[j], man)
            errs.setdefault(str(dt), []).append(max(rel(y1, ref), rel(y2, ref2), rel(y4, reference(x4, bufs[j], man))))
    return {k: max(v) for k, v in errs.items()}


def _expert_timings(x: torch.Tensor, I: int, bufs: list[torch.Tensor], slab: torch.Tensor, man: ExpertManifest,
                    lay: gk.PackedLayout, t: dict[str, float], res: dict[str, Any],
                    log: Callable[[str], None]) -> float:
    """Into ``t``: bf16 dense, hqq, dequantize + cuBLAS, our GEMV for one expert and two (eager, graphed); then
    the launch-shape sweep (graphed, 2 experts: gate-up first, then down), whose winner is installed. Returns
    the tuned time of two experts."""
    H, nrot, device = x.shape[1], len(bufs), x.device
    dense = [(torch.randn(I, H, device=device, dtype=torch.bfloat16), torch.randn(I, H, device=device, dtype=torch.bfloat16),
              torch.randn(H, I, device=device, dtype=torch.bfloat16)) for _ in range(2)]
    xb = x.to(torch.bfloat16)
    t["bf16_dense"] = timeit(lambda i: F.linear(F.silu(F.linear(xb, dense[i][0])) * F.linear(xb, dense[i][1]),
                                                dense[i][2]), 2)
    del dense
    t["hqq_torch_dequant_matmul"] = timeit(lambda i: hqq_ffn(x, bufs[i], man), nrot, reps=10)
    t["ours_dequant_cublas"] = timeit(lambda i: dequant_ffn.expert_ffn(x, bufs[i], man, lay, None), nrot)
    t["ours_expert_ffn_eager"] = timeit(lambda i: gk.expert_ffn(x, bufs[i], man), nrot)
    slots2 = [torch.tensor([[i, (i + 1) % nrot]], device=device, dtype=torch.int32) for i in range(nrot)]
    w2 = torch.tensor([[0.5, 0.5]], device=device)
    t["ours_moe_2experts_eager"] = timeit(lambda i: gk.moe_ffn(x, slab, slots2[i], w2, lay), nrot)
    sl = slots2[0].clone()
    t["ours_moe_2experts_graph"] = graph_time(lambda: gk.moe_ffn(x, slab, sl, w2, lay))
    C = gk.GemvConfig
    W = True  # W_q read by int32 words (GemvConfig.words)
    gu_cands = [C(8, 2, 1, 4, 4), C(8, 4, 1, 4, 3, W), C(8, 8, 1, 4, 3, W), C(16, 4, 1, 4, 3, W), C(4, 8, 1, 4, 3, W),
                C(8, 4, 1, 4, 4, W), C(16, 8, 1, 8, 3, W)]
    dn_cands = [C(8, 2, 4, 4, 4), C(8, 4, 4, 4, 3, W), C(8, 8, 4, 4, 3, W), C(16, 4, 4, 4, 3, W), C(8, 4, 8, 4, 3, W),
                C(8, 8, 2, 4, 3, W), C(4, 8, 4, 4, 3, W)]
    time2 = lambda gu, dn: graph_time(lambda: gk.moe_ffn(x, slab, sl, w2, lay, gate_up=gu, down=dn))  # noqa: E731
    best_gu, best_dn, best_t, sweep = _sweep(time2, gu_cands, dn_cands, gk.GATE_UP, gk.DOWN, float("inf"))
    gk.set_configs(gate_up=best_gu, down=best_dn)
    res["sweep_ms"] = sweep
    res["best_configs"] = {"gate_up": best_gu.__dict__, "down": best_dn.__dict__}
    t["ours_moe_2experts_graph_tuned"] = best_t
    t["ours_expert_ffn_eager_tuned"] = timeit(lambda i: gk.expert_ffn(x, bufs[i], man), nrot)
    log(f"tuned: gate_up={best_gu} down={best_dn}: {best_t:.4f} ms for 2 experts (graph)")
    return best_t


def _gemlite_timing(x: torch.Tensor, bufs: list[torch.Tensor], man: ExpertManifest, t: dict[str, float],
                    res: dict[str, Any], log: Callable[[str], None]) -> None:
    """gemlite's A16Wn built from our hqq views: the repack's cost, one expert's time, its error; gemlite is a
    reference point only, so a failure is recorded, not raised."""
    try:
        import gemlite
        cfg = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
        if os.path.exists(cfg):
            gemlite.load_config(cfg)
        builds = [_gemlite_expert(bufs[i], man) for i in range(2)]
        t["gemlite_build_from_views_ms"] = builds[1][1]
        gl = [b[0] for b in builds]

        def gl_ffn(i: int) -> torch.Tensor:
            l1, l3, l2 = gl[i % 2]
            return l2(F.silu(l1(x)) * l3(x))

        t["gemlite_expert_ffn"] = timeit(gl_ffn, 2)
        res["gemlite_rel_err_vs_hqq"] = rel(gl_ffn(0), reference(x, bufs[0], man))
        del gl, builds
    except Exception as e:  # noqa: BLE001 - report why it is missing
        res["gemlite_error"] = f"{type(e).__name__}: {e}"
        log(f"gemlite failed: {res['gemlite_error']}")


def _linear4_timing(H: int, device: str, t: dict[str, float], res: dict[str, Any],
                    log: Callable[[str], None]) -> None:
    """The 4-bit attention projection (qkv fused, 6144 x H) against bf16, with its launch-shape sweep, whose
    winner is installed."""
    from bench.synth import quantized_random
    C, W = gk.GemvConfig, True
    pm = quantized_random(6144, H, 4, device, 7)
    xb1 = torch.randn(1, H, device=device, dtype=torch.bfloat16)
    wd = torch.randn(6144, H, device=device, dtype=torch.bfloat16)
    t["qkv_4bit_ours"] = timeit(lambda i: gk.packed_linear(xb1, pm.w_q, pm.scale, pm.zero, pm.shape, 4, 64), 1)
    res["linear_sweep_ms"] = lin = {}
    best_lin, best_lt = gk.LINEAR, graph_time(lambda: gk.packed_linear(xb1, pm.w_q, pm.scale, pm.zero, pm.shape, 4, 64))
    for c in [C(4, 2, 1, 4, 3), C(8, 4, 1, 8, 3, W), C(8, 8, 1, 8, 3, W), C(4, 8, 1, 4, 3, W), C(16, 4, 1, 8, 3, W)]:
        ms = lin[str(c)] = graph_time(lambda: gk.packed_linear(xb1, pm.w_q, pm.scale, pm.zero, pm.shape, 4, 64, c))
        if ms < best_lt:
            best_lin, best_lt = c, ms
    gk.set_configs(linear=best_lin)
    res["best_configs"]["linear"] = best_lin.__dict__
    t["qkv_4bit_ours_graph_tuned"] = best_lt
    log(f"tuned linear={best_lin}: {best_lt:.4f} ms for qkv (graph); sweep {lin}")
    t["qkv_bf16"] = timeit(lambda i: F.linear(xb1, wd), 1)
    res["qkv_4bit_rel_err"] = rel(gk.packed_linear(xb1, pm.w_q, pm.scale, pm.zero, pm.shape, 4, 64),
                                  F.linear(xb1.float(), gk.dequantize(pm.w_q, pm.scale, pm.zero, pm.shape, 4, 64,
                                                                      "4bit_u8", torch.float32)))


def _sweep(time2: Callable[[gk.GemvConfig, gk.GemvConfig], float], gu_cands: list[gk.GemvConfig],
           dn_cands: list[gk.GemvConfig], gu: gk.GemvConfig, dn: gk.GemvConfig, best_t: float
           ) -> tuple[gk.GemvConfig, gk.GemvConfig, float, dict[str, float]]:
    """Gate-up shapes first (with the current down), then down shapes with the best gate-up; a candidate
    replaces (gu, dn) only when ``time2`` beats ``best_t``. Returns the winners, their time and every time."""
    sweep: dict[str, float] = {}
    for c in gu_cands:
        ms = sweep[f"gate_up {c}"] = time2(c, dn)
        if ms < best_t:
            gu, best_t = c, ms
    for c in dn_cands:
        ms = sweep[f"down {c}"] = time2(gu, c)
        if ms < best_t:
            dn, best_t = c, ms
    return gu, dn, best_t, sweep


def run3(shape: ModelShape, tpl3: list[tuple[np.ndarray, ExpertManifest]], device: str,
         log: Callable[[str], None]) -> dict[str, Any]:
    """3-bit experts (two planes, ``coordinator.planes3``): error against hqq, one expert eager and two graphed,
    against the Triton dequantize + cuBLAS and hqq's torch path; then a launch-shape sweep whose winner is
    installed for the runs after it."""
    H, nrot = shape.hidden, 8
    man = tpl3[0][1]
    lay = gk.layout_of(man)
    bufs = [torch.from_numpy(tpl3[i % len(tpl3)][0]).to(device) for i in range(nrot)]
    slab = torch.stack([F.pad(b, (0, (-b.numel()) % 4096)) for b in bufs])
    res: dict[str, Any] = {"expert_bytes": man.nbytes, "packing": lay.packing}
    x = torch.randn(1, H, device=device, dtype=torch.float16)
    res["rel_err_vs_hqq"] = rel(gk.expert_ffn(x, bufs[0], man), reference(x, bufs[0], man))
    t: dict[str, float] = {}
    t["gemv_expert_ffn_eager"] = timeit(lambda i: gk.expert_ffn(x, bufs[i], man), nrot)
    t["dequant_cublas"] = timeit(lambda i: dequant_ffn.expert_ffn(x, bufs[i], man, lay, None), nrot)
    t["hqq_torch"] = timeit(lambda i: hqq_ffn(x, bufs[i], man), nrot, reps=10)
    sl = torch.tensor([[0, 1]], device=device, dtype=torch.int32)
    w2 = torch.tensor([[0.5, 0.5]], device=device)
    t["moe_2experts_graph"] = graph_time(lambda: gk.moe_ffn(x, slab, sl, w2, lay))
    C = gk.GemvConfig
    W = True  # W_q read by int32 words (GemvConfig.words)
    gu_cands = [C(4, 2, 1, 4, 3), C(4, 2, 1, 4, 3, W), C(4, 4, 1, 4, 3, W), C(8, 2, 1, 4, 3, W), C(8, 4, 1, 4, 3, W),
                C(2, 4, 1, 4, 3, W), C(4, 8, 1, 4, 3, W)]
    dn_cands = [C(8, 2, 4, 4, 3), C(8, 2, 4, 4, 3, W), C(4, 2, 4, 4, 3, W), C(8, 4, 4, 4, 3, W), C(4, 4, 4, 4, 3, W),
                C(8, 4, 8, 4, 3, W), C(8, 8, 4, 4, 3, W)]
    time2 = lambda gu, dn: graph_time(lambda: gk.moe_ffn(x, slab, sl, w2, lay, gate_up=gu, down=dn))  # noqa: E731
    best_gu, best_dn, best_t, sweep = _sweep(time2, gu_cands, dn_cands, *gk.configs_for(lay),
                                             t["moe_2experts_graph"])
    gk.set_configs(gate_up3=best_gu, down3=best_dn, meta8=lay.meta8)
    res["sweep_ms"] = sweep
    res["best_configs"] = {"gate_up3": best_gu.__dict__, "down3": best_dn.__dict__}
    t["moe_2experts_graph_tuned"] = best_t
    res["ms"] = t
    res["effective_GBps_2experts_graph"] = 2 * man.nbytes / (best_t * 1e-3) / 1e9
    log(f"3-bit kernels: rel err {res['rel_err_vs_hqq']:.2e}; {t}; tuned gate_up3={best_gu} down3={best_dn}")
    return res
