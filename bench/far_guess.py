"""Would guesses several layers ahead hide the expert copies? A replay of the bench model's routing (CPU).

    python -m bench.far_guess [--tokens 144] [--reach 4] [--trace T.npz] [--out bench/results/<date>-cpu-far-guess.md]

NOTES item 63 proposes: guesses for layers l+1..l+R from each layer l's post-attention state, loaded straight
into the guessed layer's cache (its eviction victim makes room), and copies issued by priority (a layer's
demand misses first, then the nearest guesses) in blocks, so a far copy in flight delays a nearer one by at
most a block. This script replays that policy on the CPU sibling's routing (``cache_bound.routing_trace``)
through the coordinator's own ``ExpertCache`` and ``SlotPlanner``, and times it with a small model of one
decode step: a layer computes for ``c`` ms once its experts have landed, one copy engine moves an expert in
``tau`` ms, block by block, the most urgent pending load first. R = 1 is the shape of today's decoder (which
prefetches its one guess into spare buffers instead); the model ignores host gaps and launch costs, so its
times are a lower bound to set beside the GPU's, not a prediction of them. Rows marked "oracle" take
guesses that are always right: what overlap alone could buy with the cache's own loads; "+ admission" rows
keep out of the cache the misses ``ExpertCache.admits`` refuses (NOTES item 65).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.cache_bound import emit, routing_trace
from bench.synth import MIXTRAL_8X7B


@dataclass
class Load:
    """One expert copy: its target layer and expert, its urgency and how much of it is left."""

    layer: int
    expert: int
    urgency: int
    """0 for a demand miss, d for a guess d layers ahead: lower goes first."""
    left: float
    done_at: float | None = None


@dataclass
class Engine:
    """One copy engine serving the most urgent pending load a block at a time."""

    tau: float
    blocks: int
    clock: float = 0.0
    pending: list[Load] = field(default_factory=list)
    busy: float = 0.0

    def run_until(self, t: float) -> None:
        """Serves blocks that start before ``t`` (a block in progress finishes after it); the clock then
        stands at ``t`` or at that block's end."""
        self._serve(t)
        self.clock = max(self.clock, t)

    def _serve(self, t: float) -> None:
        while self.pending and self.clock < t:
            load = min(self.pending, key=lambda ld: (ld.urgency, ld.layer))
            step = min(load.left, self.tau / self.blocks)
            self.clock += step
            self.busy += step
            load.left -= step
            if load.left <= 1e-12:
                load.done_at = self.clock
                self.pending.remove(load)

    def drain(self) -> float:
        """Serves every pending load; returns when the last one landed."""
        self._serve(float("inf"))
        return self.clock

    def finish(self, loads: list[Load]) -> float:
        """Serves blocks until every load of ``loads`` is done; returns when the last one landed."""
        while any(ld.done_at is None for ld in loads):
            self.run_until(self.clock + self.tau / self.blocks / 2)
        return max((ld.done_at for ld in loads if ld.done_at is not None), default=self.clock)


def replay(trace: np.ndarray, ranked: np.ndarray, total: int, reach: int, top: int | tuple[int, ...], c: float,
           tau: float, skip: int, blocks: int = 8, every: int = 32, admission: bool = False) -> dict[str, float]:
    """Per-token loads and modelled time of the far-guess policy with ``total`` slots (see module doc). ``top``
    guesses at every distance, or ``top[d - 1]`` at distance d. With ``admission`` (``ExpertCache.admits``), an
    expert the cache does not admit is still copied, into a transient buffer for its step, and only remembered."""
    tops = top if isinstance(top, tuple) else (top,) * reach
    from coordinator.cache import ExpertCache, spread_slots
    from coordinator.partition import SlotPlanner
    from expert_workers.format import ExpertKey

    steps, layers, k = trace.shape
    cache = ExpertCache(layers, spread_slots(total, layers), 0, 1, torch.device("cpu"), eviction="lrfu")
    planner = SlotPlanner(layers, int(trace.max()) + 1, floor=k)
    engine = Engine(tau, blocks)
    inflight: dict[tuple[int, int], Load] = {}
    guesses: set[tuple[int, int]] = set()  # (layer, expert) loaded on a guess for this step
    transient: set[tuple[int, int]] = set()  # loaded for this step only (not admitted)
    count = {"loads": 0, "wrong": 0}
    now = start = busy0 = 0.0

    def load(layer: int, expert: int, urgency: int, protect: set[int], counted: bool) -> None:
        if not admission or cache.admits(layer, expert, protect):
            cache.insert(layer, expert, cache.take_victim(layer, protect), None)  # type: ignore[arg-type]
        else:
            cache.remember(layer, expert)
            transient.add((layer, expert))
        for key in [key for key in inflight if key[0] == layer and key not in transient
                    and not cache.contains(ExpertKey(*key))]:
            gone = inflight.pop(key)  # evicted before it landed: its remaining blocks are cancelled
            if gone in engine.pending:
                engine.pending.remove(gone)
        inflight[(layer, expert)] = Load(layer, expert, urgency, tau)
        engine.pending.append(inflight[(layer, expert)])
        count["loads"] += counted

    for t in range(steps):
        counted = t >= skip
        if t == skip:
            start, busy0, count["loads"], count["wrong"] = now, engine.busy, 0, 0
        if t and t % every == 0:
            now = max(now, engine.drain())  # the cache moves buffers only with nothing in flight
            inflight.clear()
            cache.repartition(planner.plan(total))
        for layer in range(layers):
            used = sorted(set(trace[t, layer].tolist()))
            planner.observe(layer, used)
            engine.run_until(now)
            misses = [f.expert for f in cache.lookup(layer, used) if f.buffer is None
                      and (layer, f.expert) not in transient]  # a transient copy made for this step serves it
            for e in misses:  # demand: the most urgent copies
                load(layer, e, 0, set(used), counted)
            count["wrong"] += counted * sum(1 for g in guesses if g[0] == layer and g[1] not in used)
            guesses = {g for g in guesses if g[0] != layer}
            for d in range(1, reach + 1):  # guesses from this layer's state, nearest first
                if layer + d < layers:
                    guess = [int(e) for e in ranked[t, layer, d - 1, :tops[d - 1]]]
                    for e in guess:
                        if not cache.contains(ExpertKey(layer + d, e)) and (layer + d, e) not in transient:
                            load(layer + d, e, d, set(guess), counted)
                            guesses.add((layer + d, e))
            need = [inflight.pop((layer, e)) for e in used if (layer, e) in inflight]
            transient -= {(layer, e) for e in used}
            now = max(now, engine.finish(need) if need else now) + c
        guesses.clear()  # a guess is for its own step, and so is a transient copy
        transient.clear()
    tokens = steps - skip
    return {"loads_per_token": count["loads"] / tokens, "wrong_per_token": count["wrong"] / tokens,
            "ms_per_token": (now - start) / tokens, "copy_busy": (engine.busy - busy0) / max(now - start, 1e-9)}


def oracle_guesses(trace: np.ndarray, reach: int) -> np.ndarray:
    """Guesses that are always right ([T, L, reach, E] like ``routing_trace``'s): the experts layer l+d will use,
    first. What overlap alone could buy, with the bytes of a perfect predictor."""
    steps, layers, k = trace.shape
    experts = int(trace.max()) + 1
    out = np.tile(np.arange(experts), (steps, layers, reach, 1))
    for d in range(1, reach + 1):
        out[:, :layers - d, d - 1, :k] = trace[:, d:]
    return out


def _cases(text: str, gbps: float) -> list[tuple[str, int, float, float]]:
    """(name, slots, compute ms a layer, copy ms an expert) from 'NAME:SLOTS:MS_A:EXPERT_MB;...'."""
    out = []
    for item in text.split(";"):
        name, slots, ms_a, mb = item.rsplit(":", 3)
        out.append((name, int(slots), float(ms_a) / MIXTRAL_8X7B.layers, float(mb) * 1e6 / (gbps * 1e9) * 1e3))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=144)
    ap.add_argument("--skip", type=int, default=16)
    ap.add_argument("--reach", type=int, default=4)
    ap.add_argument("--trace", default="", help="an .npz of the routing and the guesses: read when it exists")
    ap.add_argument("--cases", default="",
                    help="'NAME:SLOTS:MS_A:EXPERT_MB;...' (MS_A: (a)'s ms a token; default: s9b's 8 GB and s9c's "
                         "3-bit 12 GB)")
    ap.add_argument("--gbps", type=float, default=54.0, help="pinned H2D bandwidth for --cases")
    ap.add_argument("--mixed", default="",
                    help="'2,1;2,1,1': also guesses this many experts at distance 1, 2, ..., with admission")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.trace and Path(a.trace).is_file():
        z = np.load(a.trace)
        trace, ranked = z["trace"], z["ranked"]
    else:
        trace, ranked = routing_trace(MIXTRAL_8X7B, a.tokens, reach=a.reach)  # type: ignore[misc]
        if a.trace:
            np.savez(a.trace, trace=trace, ranked=ranked)
    cases = _cases(a.cases or "2-bit 8 GB, 107 slots:107:8.31:55.05;3-bit 12 GB, 128 slots:128:9.30:77.07", a.gbps)
    cmd = (f" --cases '{a.cases}' --gbps {a.gbps}" if a.cases else "") + (f" --mixed '{a.mixed}'" if a.mixed else "")
    lines = ["# Guesses several layers ahead, replayed (CPU sibling of the GPU model, modelled time)", "",
             f"`python -m bench.far_guess --tokens {a.tokens} --skip {a.skip} --reach {a.reach}{cmd}`", "",
             "| case | reach | top | loads/token | wrong guesses/token | modelled ms/token | copy engine busy |",
             "|---|---|---|---|---|---|---|"]
    oracle = oracle_guesses(trace, a.reach)
    for name, slots, c, tau in cases:
        for tops in [(2,)] + [tuple(int(n) for n in m.split(",")) for m in a.mixed.split(";") if m]:  # (2,): today's
            r = replay(trace, ranked, slots, len(tops), tops, c, tau, a.skip, admission=True)
            lines.append(f"| {name} + admission | {len(tops)} | {'/'.join(map(str, tops))} | "
                         f"{r['loads_per_token']:.1f} | {r['wrong_per_token']:.1f} | {r['ms_per_token']:.1f} | "
                         f"{r['copy_busy']:.2f} |")
        for guesses, label in ((ranked, ""), (oracle, " (oracle)")):
            for reach in range(1, a.reach + 1):
                for top in (1, 2) if not label else (2,):
                    r = replay(trace, guesses, slots, reach, top, c, tau, a.skip)
                    lines.append(f"| {name}{label} | {reach} | {top} | {r['loads_per_token']:.1f} | "
                                 f"{r['wrong_per_token']:.1f} | {r['ms_per_token']:.1f} | {r['copy_busy']:.2f} |")
    emit(lines, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
