"""How few expert loads *any* cache could make on the benchmark's model: Belady's MIN against LRU (CPU).

    python -m bench.cache_bound [--tokens 144] [--trace T.npy] [--reach R] [--out bench/results/<date>-cpu-cache-bound.md]

The GPU benchmark's model (``bench.synth``: random Mixtral-8x7B-shaped weights, 2-bit experts from 4 templates,
4-bit attention shared by the layers, teacher-forced inputs) is rebuilt here on the CPU from the same recipe.
Its random draws differ (CPU generators, not CUDA ones), so it is a sibling of the GPU model, not the same
one; the LRU hit rates it gives are set beside the GPU's (c′) rows to check that the siblings route alike.
Teacher forcing fixes every input, so the whole sequence runs as one causal forward: the routing of each
position is the routing a token-by-token decode makes.

Per layer, a cache of k slots meets the trace's top-2 experts step by step. LRU evicts the least recently
used; Belady's MIN evicts the expert used again furthest in the future (never one the step needs), the fewest
loads any replacement policy makes with k slots. A budget of S slots is spread over the layers by dynamic
programming over the per-layer curves, for both policies: the best any planner could do. Beside them, the
coordinator's own ``ExpertCache`` and ``SlotPlanner`` on the same trace (no prefetch).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.synth import MIXTRAL_8X7B, ModelShape


def _quantized(out: int, inp: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    """A random [out, in] matrix ~ N(0, 1/in) through hqq's quantize (g64, without its optimizer, which takes
    minutes per Mixtral matrix on two cores) and dequantize: the kind of weight the GPU model holds."""
    from hqq.core.quantize import Quantizer

    w = torch.randn(out, inp, generator=gen) / inp ** 0.5
    w_q, meta = Quantizer.quantize(w, nbits=bits, group_size=64, axis=1, optimize=False, device="cpu")
    return Quantizer.dequantize(w_q, meta).float()


def routing_trace(shape: ModelShape, tokens: int, templates: int = 4, seed: int = 0,
                  reach: int = 0) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """[T, L, 2] expert ids routed at each position of a teacher-forced sequence through the sibling model.
    With ``reach`` R > 0 also the guesses the coordinator's decoder would make: [T, L, R, E], the experts of
    layer l + d ranked by layer l+d's router on layer l's post-attention normed state (d = 1..R; as
    ``coordinator.decode`` guesses, a norm's unit weight aside), so ``guess_recall`` can score them."""
    gen = torch.Generator().manual_seed(seed)
    h, d, nh, nkv, L = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads, shape.layers
    experts = [[_quantized(shape.inter, h, 2, gen), _quantized(shape.inter, h, 2, gen),
                _quantized(h, shape.inter, 2, gen)] for _ in range(templates)]
    qkv, o = _quantized((nh + 2 * nkv) * d, h, 4, gen), _quantized(h, nh * d, 4, gen)
    embed = torch.randn(shape.vocab, h, generator=gen)
    routers = [torch.randn(shape.experts, h, generator=gen) * h ** -0.5 for _ in range(L)]
    ids = torch.randint(0, shape.vocab, (tokens,), generator=torch.Generator().manual_seed(4321))
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(tokens, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()                                           # [T, d/2]
    x = embed[ids]                                                            # [T, H]
    trace = np.zeros((tokens, L, shape.top_k), dtype=np.int64)
    ranked = np.zeros((tokens, L, reach, shape.experts), dtype=np.int64)
    for layer in range(L):
        t0 = time.perf_counter()
        qkv_t = (F.rms_norm(x, (h,), eps=1e-5) @ qkv.T).view(tokens, nh + 2 * nkv, d)
        x1, x2 = qkv_t[..., : d // 2], qkv_t[..., d // 2:]
        rot = torch.cat((x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]), dim=-1)
        q, k, v = rot[:, :nh], rot[:, nh:nh + nkv], qkv_t[:, nh + nkv:]
        att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             is_causal=True, enable_gqa=True, scale=1.0 / math.sqrt(d))
        x = x + att.transpose(0, 1).reshape(tokens, nh * d) @ o.T
        xn = F.rms_norm(x, (h,), eps=1e-5)
        wts, top = torch.topk(torch.softmax(xn @ routers[layer].T, dim=-1), shape.top_k, dim=-1)
        wts = wts / wts.sum(-1, keepdim=True)
        trace[:, layer] = top.numpy()
        for ahead in range(1, reach + 1):
            if layer + ahead < L:
                ranked[:, layer, ahead - 1] = torch.argsort(xn @ routers[layer + ahead].T, dim=-1,
                                                            descending=True).numpy()
        y = torch.zeros_like(x)
        for e in range(shape.experts):                                       # expert e is template e mod T
            rows, slot = (top == e).nonzero(as_tuple=True)
            if len(rows):
                w1, w3, w2 = experts[e % templates]
                xe = xn[rows]
                y.index_add_(0, rows, (F.silu(xe @ w1.T) * (xe @ w3.T)) @ w2.T * wts[rows, slot, None])
        x = x + y
        print(f"layer {layer}: {time.perf_counter() - t0:.1f}s", flush=True)
    return (trace, ranked) if reach else trace


def guess_recall(trace: np.ndarray, ranked: np.ndarray, d: int, top: int, skip: int = 0) -> float:
    """Share of the experts each position uses in layers l ≥ d that the top-``top`` guess made d layers
    earlier (``routing_trace(reach=...)``) names, counted from position ``skip``."""
    steps, layers, k = trace.shape
    found = total = 0
    for layer in range(d, layers):
        guess = ranked[skip:, layer - d, d - 1, :top]                        # [T, top]
        used = trace[skip:, layer]                                           # [T, k]
        found += int((used[:, :, None] == guess[:, None, :]).any(-1).sum())
        total += used.size
    return found / total


def lru_misses(steps: np.ndarray, slots: int, skip: int = 0) -> int:
    """Loads of an LRU cache of ``slots`` experts over ``steps`` [T, k] (one layer), counted from step ``skip``."""
    order: list[int] = []
    misses = 0
    for t, need in enumerate(steps.tolist()):
        for e in need:
            if e in order:
                order.remove(e)
            else:
                misses += t >= skip
                if len(order) + 1 > slots:
                    order.pop(next(i for i, x in enumerate(order) if x not in need))
            order.append(e)
    return misses


def belady_misses(steps: np.ndarray, slots: int, skip: int = 0) -> int:
    """Loads of Belady's MIN with ``slots`` experts over ``steps`` [T, k], counted from step ``skip``: on a miss,
    evict the resident expert used again furthest ahead (never one this step needs). The warm-up steps run in
    the same pass, since MIN's choices there depend on the steps after them."""
    uses: dict[int, list[int]] = {}
    for t, need in enumerate(steps.tolist()):
        for e in need:
            uses.setdefault(e, []).append(t)
    resident: set[int] = set()
    misses = 0
    for t, need in enumerate(steps.tolist()):
        for e in need:
            if e in resident:
                continue
            misses += t >= skip
            if len(resident) >= slots:
                def next_use(x: int) -> int:
                    later = [u for u in uses[x] if u > t]
                    return later[0] if later else 1 << 30
                resident.remove(max((x for x in resident if x not in need), key=next_use))
            resident.add(e)
    return misses


def coordinator_misses(trace: np.ndarray, total: int, skip: int, eviction: str = "lrfu", every: int = 32,
                       admission: bool = False) -> int:
    """Loads of the coordinator's own cache (``ExpertCache`` with ``eviction``, slots re-planned by
    ``SlotPlanner`` every ``every`` steps, no prefetch; with ``admission``, misses it does not admit pass
    by) over ``trace`` [T, L, k] with ``total`` slots, counted after the first ``skip`` steps."""
    from coordinator.cache import ExpertCache, spread_slots
    from coordinator.partition import SlotPlanner
    from coordinator.replay import cache_step

    steps, layers, top_k = trace.shape
    cache = ExpertCache(layers, spread_slots(total, layers), 0, 1, torch.device("cpu"), eviction=eviction)
    planner = SlotPlanner(layers, int(trace.max()) + 1, floor=top_k)
    before = 0
    for t in range(steps):
        if t == skip:
            before = cache.counters.misses
        if t and t % every == 0:
            cache.repartition(planner.plan(total))
        for layer in range(layers):
            used = sorted(set(trace[t, layer].tolist()))
            planner.observe(layer, used)
            cache_step(cache, layer, used, admission)
    return cache.counters.misses - before


def best_spread(curves: list[list[int]], total: int, floor: int) -> tuple[int, list[int]]:
    """Fewest loads with ``total`` slots over the layers, each given ``floor``..len(curve)−1 slots, where
    curves[l][k] is layer l's loads with k slots (dynamic programming); returns (loads, slots per layer)."""
    inf = 1 << 60
    best = [0] + [inf] * total                                               # best[s]: loads of layers so far
    picks: list[list[int]] = []
    for curve in curves:
        nxt, pick = [inf] * (total + 1), [0] * (total + 1)
        for s, base in enumerate(best):
            if base == inf:
                continue
            for k in range(floor, len(curve)):
                if s + k <= total and base + curve[k] < nxt[s + k]:
                    nxt[s + k], pick[s + k] = base + curve[k], k
        best = nxt
        picks.append(pick)
    s = min(range(total + 1), key=lambda i: best[i])
    loads, spread = best[s], []
    for pick in reversed(picks):
        spread.append(pick[s])
        s -= pick[s]
    return loads, spread[::-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=144, help="positions (the GPU run: 8 prompt + 8 warm-up + 128)")
    ap.add_argument("--skip", type=int, default=16, help="positions that warm the caches and are not counted")
    ap.add_argument("--budgets", default="91,164", help="total slots to spread (8 GB: 91, 12 GB: 164 in s8c)")
    ap.add_argument("--trace", default="", help="a .npy routing trace: read when it exists, else written")
    ap.add_argument("--reach", type=int, default=0,
                    help="also score guesses made 1..R layers ahead (recomputes the forward: no --trace reuse)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    ranked = None
    if a.reach:
        trace, ranked = routing_trace(MIXTRAL_8X7B, a.tokens, reach=a.reach)  # type: ignore[misc]
    elif a.trace and Path(a.trace).is_file():
        trace = np.load(a.trace)
    else:
        trace = routing_trace(MIXTRAL_8X7B, a.tokens)  # type: ignore[assignment]
    if a.trace and not Path(a.trace).is_file():
        np.save(a.trace, trace)
    E, counted = MIXTRAL_8X7B.experts, a.tokens - a.skip
    curves = {}
    for name, fn in (("lru", lru_misses), ("belady", belady_misses)):
        curves[name] = [[0, 0] + [fn(trace[:, layer], k, a.skip) for k in range(2, E + 1)]
                        for layer in range(MIXTRAL_8X7B.layers)]
    uses = 2 * MIXTRAL_8X7B.layers * counted
    lines = ["# Expert loads per token: LRU against Belady's MIN (CPU sibling of the GPU model)", "",
             f"`python -m bench.cache_bound --tokens {a.tokens} --skip {a.skip} --budgets {a.budgets}"
             + (f" --reach {a.reach}" if a.reach else "") + "`; "
             f"{counted} counted positions after {a.skip} warm-up ones.", "",
             "| slots | LRU hit | Belady hit | LRU loads/token | Belady loads/token |", "|---|---|---|---|---|"]
    for k in range(2, E + 1):
        lru, bel = (sum(c[k] for c in curves[n]) for n in ("lru", "belady"))
        lines.append(f"| {k} per layer | {1 - lru / uses:.3f} | {1 - bel / uses:.3f} | {lru / counted:.1f} | "
                     f"{bel / counted:.1f} |")
    for total in (int(b) for b in a.budgets.split(",") if b):
        (lru, lru_s), (bel, bel_s) = (best_spread(curves[n], total, 2) for n in ("lru", "belady"))
        lines.append(f"| {total} spread by DP | {1 - lru / uses:.3f} | {1 - bel / uses:.3f} | "
                     f"{lru / counted:.1f} | {bel / counted:.1f} |")
        for eviction, admission in (("lru", False), ("lrfu", False), ("lrfu", True)):
            ours = coordinator_misses(trace, total, a.skip, eviction, admission=admission)
            label = eviction + (" + admission" if admission else "")
            lines.append(f"|   the coordinator's cache, {label}, planned every 32 steps | {1 - ours / uses:.3f} | | "
                         f"{ours / counted:.1f} | |")
        lines.append(f"|   Belady's spread | {bel_s} | | | |")
    if ranked is not None:
        lines += ["", "Guesses made d layers ahead (layer l+d's router on layer l's post-attention state), share of "
                  "the used experts found:", "", "| d | top-1 | top-2 | top-3 | top-4 |", "|---|---|---|---|---|"]
        for d in range(1, a.reach + 1):
            found = " | ".join(f"{guess_recall(trace, ranked, d, n, a.skip):.3f}" for n in range(1, 5))
            lines.append(f"| {d} | {found} |")
    emit(lines, a.out)
    return 0


def emit(lines: list[str], out: str) -> None:
    """Prints a markdown report and writes it to ``out`` when one is given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
