"""Our experts inside transformers' Mixtral: the MoE block computed from the hot expert cache.

transformers 5 routes every ``MixtralExperts.forward`` through ``ALL_EXPERTS_FUNCTIONS``; we register
``offloaded_experts_forward`` there, and it hands the layer's tokens to ``ExpertRunner.forward``. The router,
attention and KV cache stay transformers' own.

One MoE step (a prefill chunk or one decode token), short on purpose:
    route (given, read to the host once) -> look up the cache -> start fetches for misses -> compute.
How experts are computed is a ``MoePath`` chosen once per runner (``select_path``):
- "hqq" (CPU, and whatever the GPU kernels do not read): per expert, as misses land, hqq's dequantize + matmul;
- "dequant" (CUDA, SiLU, one layout the GEMV kernels do not read, e.g. hqq's own "3bit_32" from a worker of
  an older make): per expert, as misses land, a Triton dequantize of a few rows at a time into a small
  reused workspace + cuBLAS (``gpu_kernels.expert_ffn``);
- "gemv_layer" (CUDA, SiLU, one u8-packed 2/3/4/8-bit layout): the layer's misses land first, then one
  ``gpu_kernels.moe_ffn`` launch pair computes every routed (token, expert) pair straight from the cache
  arena, reading arena rows from a device tensor; a step that cannot hold all its experts at once (more
  distinct experts than cache slots, or a prefill) goes per expert, with the Triton GEMV for ≤ 4 tokens
  and the "dequant" path's kernels for more.
After decoder layer l, a forward hook applies layer l+1's router (through its post-attention norm) to the
residual stream and prefetches the top ``prefetch`` experts that are not cached into spare buffers.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from coordinator import gpu_kernels as gk
from coordinator.cache import ExpertCache
from coordinator.partition import SlotPlanner
from coordinator.transfer import Load, Transfers
from expert_workers.format import ExpertKey, ExpertManifest, dequantize_views

log = logging.getLogger(__name__)
EXPERTS_IMPLEMENTATION = "moe_serving_offload"
RECALL_TOP = (1, 2, 3)

SlotViews = Mapping[str, Mapping[str, torch.Tensor]]
ExpertFn = Callable[[SlotViews, ExpertManifest, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def _weight(views: SlotViews, manifest: ExpertManifest, name: str, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_views(manifest.matrices[name], views[name]).to(dtype)


def expert_ffn(slot_views: SlotViews, manifest: ExpertManifest, x: torch.Tensor,
               act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> torch.Tensor:
    """One expert on its routed tokens, from the packed form in a cache slot: ``w2 · (act(w1·x) * (w3·x))``.

    x: [T, H] -> [T, H]. Dequantizes with hqq's own Quantizer (bit-identical to hqq) into x's dtype, then
    matmuls: the reference every other path is checked against.
    """
    w1 = _weight(slot_views, manifest, "w1", x.dtype)  # [I, H]
    w3 = _weight(slot_views, manifest, "w3", x.dtype)  # [I, H]
    w2 = _weight(slot_views, manifest, "w2", x.dtype)  # [H, I]
    return F.linear(act(F.linear(x, w1)) * F.linear(x, w3), w2)


def gpu_expert_ffn(slot_views: SlotViews, manifest: ExpertManifest, x: torch.Tensor,
                   act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> torch.Tensor:
    """``expert_ffn`` through ``gpu_kernels`` (SiLU and a packing it reads: checked once by ``select_path``):
    the Triton GEMV for ≤ GEMV_MAX_TOKENS tokens of a fused layout, else the Triton dequantize, a block of rows
    at a time, + cuBLAS."""
    return gk.expert_ffn_views(slot_views, manifest, x)


@dataclass(frozen=True)
class MoePath:
    """How a runner computes its experts; chosen once, at start."""

    name: str
    """"hqq", "dequant" or "gemv_layer"."""
    expert_fn: ExpertFn
    """One expert on its tokens (per-expert steps)."""
    layout: gk.PackedLayout | None = None
    """The one packed layout every expert has, when whole layers go through ``gpu_kernels.moe_ffn``."""


HQQ_PATH = MoePath("hqq", expert_ffn)


def _is_silu(act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    return act is F.silu or type(act).__name__ in ("SiLU", "SiLUActivation")


def select_path(device: torch.device, act: Callable[[torch.Tensor], torch.Tensor],
                manifests: Mapping[ExpertKey, ExpertManifest]) -> MoePath:
    """The fastest path for this device, activation and expert format; hqq's wherever the kernels do not
    apply (CPU: the exactness reference)."""
    if device.type != "cuda" or not gk.HAVE_TRITON or not _is_silu(act) or not manifests:
        return HQQ_PATH
    layouts = {gk.layout_of(m) for m in manifests.values()}
    if len(layouts) != 1:
        return HQQ_PATH
    layout = layouts.pop()
    if not layout.fused and layout.bits != 16:  # no GEMV kernel, but hqq's torch dequantize is slower
        return MoePath("dequant", gpu_expert_ffn)
    return MoePath("gemv_layer", gpu_expert_ffn, layout) if layout.fused else HQQ_PATH


@dataclass
class RecallCounters:
    """How often layer l+1's router applied after layer l named the experts decode steps then used."""

    used: int = 0
    """Experts used by decode steps in layers that had a prediction."""
    found: dict[int, int] = field(default_factory=lambda: {n: 0 for n in RECALL_TOP})
    """n -> how many of those were in the top-n prediction."""


def offloaded_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts implementation registered with transformers (signature fixed by ``MixtralExperts``)."""
    return self.runner.forward(self.layer_idx, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, offloaded_experts_forward)


class ExpertRunner:
    """Computes MoE blocks from the ExpertCache, fetching misses and prefetching the next layer's experts."""

    def __init__(self, model: nn.Module, cache: ExpertCache, transfers: Transfers,
                 manifests: Mapping[ExpertKey, ExpertManifest], prefetch: int,
                 planner: SlotPlanner | None = None, repartition_every: int = 0) -> None:
        self.layers = model.model.layers
        self.cache = cache
        self.transfers = transfers
        self.manifests = manifests
        self.prefetch = prefetch
        self.planner = planner if repartition_every > 0 else None
        """Counts decode traffic per layer and plans the slots (``coordinator.partition``); None: fixed."""
        self.repartition_every = repartition_every
        self._steps = 0  # forward passes begun (begin_step), for the partition's period
        self.recall = RecallCounters()
        self._act = self.layers[0].mlp.experts.act_fn
        self.path = select_path(cache.arena.device, self._act, manifests)
        self._moe = self._moe_layer if self.path.layout is not None else self._moe_per_expert
        self._prefetch_loads: dict[ExpertKey, tuple[Load, int]] = {}  # unlanded prefetches -> spare buffer
        self._orphans: list[Load] = []  # prefetches whose spare was reclaimed before they landed
        self._predicted: dict[int, list[int]] = {}  # layer -> experts ranked by the previous layer's guess
        self._held: set[ExpertKey] = set()  # what the latest ``predict`` wants kept (``predict_ahead`` spares it)
        for i, layer in enumerate(self.layers):
            layer.mlp.experts.runner = self
            if prefetch > 0 and i + 1 < len(self.layers):
                layer.register_forward_hook(self._hook(i))
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)

    # -- the MoE block -------------------------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Shapes (T tokens in this step, H hidden, K experts per token, E experts in the layer):
            x              [T, H]   post-attention-norm hidden states
            top_k_index    [T, K]   routed experts, < E
            top_k_weights  [T, K]   float32 routing weights (normalized over K)
            returns        [T, H]   sum_k weight[t, k] * expert_{index[t, k]}(x[t])
        """
        if layer == 0:
            self.begin_step()
        return self.run_layer(layer, x, top_k_index, top_k_weights)

    def begin_step(self) -> None:
        """A new forward pass starts: guesses left over from a failed step must not be scored; every
        ``repartition_every`` passes the slots are planned again."""
        self._predicted.clear()
        self._steps += 1
        if self.planner is not None and self._steps % self.repartition_every == 0:
            self.repartition()

    def repartition(self) -> int:
        """Gives each layer the slots the planner's counts ask for (between steps: no load is in flight into a
        layer's buffers then). Returns how many buffers changed layer."""
        assert self.planner is not None
        return self.cache.repartition(self.planner.plan(sum(self.cache.layer_slots)))

    def run_layer(self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
        """One MoE block (shapes as in ``forward``): fetch what is missing, compute."""
        self._pump()
        routing = top_k_index.tolist()  # the layer's one device->host read; everything below plans from it
        used = sorted({e for row in routing for e in row})
        self._count_recall(layer, used, decode=x.shape[0] == 1)
        return self._moe(layer, x, routing, used, top_k_weights)

    def resident_rows(self, layer: int, routing: list[list[int]]) -> tuple[list[list[int]], list[int], bool]:
        """For a caller that computes the layer itself (``coordinator.decode``'s CUDA graphs): makes every
        routed expert resident, orders the compute stream after their copies and returns the arena row of each
        (token, k), the buffers to pass to ``after_compute`` once the kernels reading them are queued, and
        whether all of them already sat in the layer's LRU (no row was loaded or changed owner)."""
        self._pump()
        used = sorted({e for row in routing for e in row})
        self._count_recall(layer, used, decode=len(routing) == 1)
        rows, all_hit = self._make_resident(layer, used)
        buffers = sorted(set(rows.values()))
        for buf in buffers:
            self.transfers.before_compute(buf)
        return [[rows[e] for e in row] for row in routing], buffers, all_hit

    def moe_rows(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert in arena row slots[t, k] (x [T, H], slots/weights [T, K]) -> [T, H]:
        ``gpu_kernels.moe_ffn`` on the fused layout (no host sync), else ``_apply`` per distinct row, the rows
        standing in for expert ids (CPU: hqq's exact math). A row holding nothing adds nothing: only a
        speculative segment that is then discarded gathers one (``coordinator.decode``)."""
        if self.path.layout is not None:
            return gk.moe_ffn(x, self.cache.arena, slots, weights, self.path.layout)
        out = torch.zeros_like(x)
        routing = slots.tolist()
        for buf in sorted({b for row in routing for b in row}):
            if buf in self.cache.manifests:
                self._apply(buf, buf, x, routing, weights, out)
        return out

    def after_compute(self, buffers: list[int]) -> None:
        """The kernels reading ``buffers`` are queued: their rows may be overwritten after them."""
        for buf in buffers:
            self.transfers.after_compute(buf)

    def _moe_per_expert(self, layer: int, x: torch.Tensor, routing: list[list[int]], used: list[int],
                        top_k_weights: torch.Tensor) -> torch.Tensor:
        """Resident experts first, then prefetched ones, then misses as they land (each computed at once)."""
        found = self.cache.lookup(layer, used)
        misses = [self._start(ExpertKey(layer, f.expert)) for f in found if f.buffer is None]
        out = torch.zeros_like(x)
        todo = set(used)

        def apply(buf: int, expert: int) -> None:
            self._apply(buf, expert, x, routing, top_k_weights, out)
            todo.discard(expert)

        try:
            for f in sorted((f for f in found if f.buffer is not None), key=lambda f: f.prefetched):
                if f.prefetched:
                    self._land_prefetch(ExpertKey(layer, f.expert))
                apply(f.buffer, f.expert)  # type: ignore[arg-type]
                if f.prefetched:
                    self.cache.promote(layer, f.expert, todo)
            self._land_misses(layer, misses, todo, apply)
        except BaseException:
            self.transfers.drain([ld for ld in misses if not ld.landed])
            raise
        return out

    def _moe_layer(self, layer: int, x: torch.Tensor, routing: list[list[int]], used: list[int],
                   top_k_weights: torch.Tensor) -> torch.Tensor:
        """Every routed expert made resident (misses land, prefetched ones join the LRU), then one
        ``gpu_kernels.moe_ffn`` over the arena: two launches for the layer, no host sync."""
        if x.shape[0] > gk.GEMV_MAX_TOKENS or len(used) > self.cache.layer_slots[layer]:
            return self._moe_per_expert(layer, x, routing, used, top_k_weights)  # cannot hold them all at once
        rows, _ = self._make_resident(layer, used)
        slots = self._to_device([[rows[e] for e in row] for row in routing], torch.int32)
        buffers = sorted(set(rows.values()))
        for buf in buffers:
            self.transfers.before_compute(buf)
        assert self.path.layout is not None
        out = gk.moe_ffn(x, self.cache.arena, slots, top_k_weights, self.path.layout)
        self.after_compute(buffers)
        return out

    def _make_resident(self, layer: int, used: list[int]) -> tuple[dict[int, int], bool]:
        """Every expert of ``used`` in an arena row of ``layer`` (misses land, prefetched ones join the LRU):
        expert -> row, and whether all were in the LRU already. Needs len(used) <= the layer's slots."""
        hit = self.cache.touch_resident(layer, used)  # all resident, the common case: a dict check per expert
        if hit is not None:
            return dict(zip(used, hit)), True
        found = self.cache.lookup(layer, used)
        misses = [self._start(ExpertKey(layer, f.expert)) for f in found if f.buffer is None]
        rows = {f.expert: f.buffer for f in found if f.buffer is not None}
        protect = set(used)
        try:
            for f in found:
                if f.prefetched:
                    self._land_prefetch(ExpertKey(layer, f.expert))
            self._land_misses(layer, misses, protect, lambda buf, expert: rows.__setitem__(expert, buf))
        except BaseException:
            self.transfers.drain([ld for ld in misses if not ld.landed])
            raise
        for f in found:
            if f.prefetched:
                self.cache.promote(layer, f.expert, protect)  # the row stays; only its owner changes
        return rows, False

    def _land_misses(self, layer: int, misses: list[Load], protect: set[int],
                     on_land: Callable[[int, int], None]) -> None:
        """Misses in the order they land; each takes the cache's victim among experts not in ``protect`` (those
        this step still has to compute), then ``on_land(buffer, expert)``."""
        pending = list(misses)
        while pending:
            load = self.transfers.wait_any(pending + self._unlanded_prefetches())
            if load not in pending:
                self._pump()
                continue
            pending.remove(load)
            buf, admitted = self._place(layer, load, protect)
            try:
                manifest = self.transfers.land(load, buf)
            except BaseException:
                if admitted:
                    self.cache.free_buffer(layer, buf)
                else:
                    self.cache.release_spare(load.key)
                raise
            if admitted:
                self.cache.insert(layer, load.key.expert, buf, manifest)
            on_land(buf, load.key.expert)

    def _place(self, layer: int, load: Load, protect: set[int]) -> tuple[int, bool]:
        """The buffer a demand miss lands in, and whether it joins the layer's LRU: its eviction victim, or,
        when admission refuses it (``ExpertCache.admits``), a spare buffer, where it stays like a prefetched
        expert until a prefetch needs the spare (a spare this step's experts or the latest guess hold is never
        taken; with none to give, the miss is admitted after all)."""
        expert = load.key.expert
        if self.cache.admission and not self.cache.admits(layer, expert, protect):
            keep = {ExpertKey(layer, e) for e in protect} | self._held
            got = self.cache.reserve_spare(load.key, load.manifest, keep, prefetch=False)
            if got is not None:
                buf, reclaimed = got
                if reclaimed is not None and reclaimed in self._prefetch_loads:
                    self._orphans.append(self._prefetch_loads.pop(reclaimed)[0])
                self.cache.remember(layer, expert)
                return buf, False
        return self.cache.take_victim(layer, protect), True

    def _apply(self, buf: int, expert: int, x: torch.Tensor, routing: list[list[int]],
               top_k_weights: torch.Tensor, out: torch.Tensor) -> None:
        pairs = [(t, k) for t, row in enumerate(routing) for k, e in enumerate(row) if e == expert]
        token_idx, k_pos = self._to_device(list(zip(*pairs)), torch.long)  # as torch.where would give them
        self.transfers.before_compute(buf)
        y = self.path.expert_fn(self.cache.views(buf), self.cache.manifests[buf], x[token_idx], self._act)
        out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
        self.transfers.after_compute(buf)

    def _to_device(self, data: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        """Host-planned indices onto the compute device without a sync (pinned, non-blocking on CUDA)."""
        t = torch.tensor(data, dtype=dtype)
        device = self.cache.arena.device
        if device.type != "cuda":
            return t
        return t.pin_memory().to(device, non_blocking=True)

    def _start(self, key: ExpertKey) -> Load:
        load = self.transfers.start(key, self.manifests[key])
        assert load is not None  # demand loads are never dropped
        return load

    # -- speculative prefetch ------------------------------------------------------------------------
    def _hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
            self.after_layer(layer, output[0] if isinstance(output, tuple) else output)

        return hook

    def after_layer(self, layer: int, hidden: torch.Tensor) -> None:
        """Predicts layer+1's experts from the residual stream after ``layer`` and prefetches the top ones.
        hidden: [B, T, H]; the guess ranks experts by routing probability summed over the T tokens."""
        nxt = self.layers[layer + 1]
        normed = nxt.post_attention_layernorm(hidden).reshape(-1, hidden.shape[-1])
        logits = F.linear(normed, nxt.mlp.gate.weight)  # [T, E]
        score = torch.softmax(logits.float(), dim=-1).sum(dim=0)  # [E]
        self.predict(layer + 1, score.argsort(descending=True).tolist())

    def predict(self, layer: int, ranked: list[int]) -> None:
        """Records the guess for ``layer`` (experts, most likely first; scored for recall when the layer
        runs) and prefetches its top ``prefetch`` experts that are not cached."""
        self._predicted[layer] = ranked
        self._held = self._prefetch_top(layer, ranked, set())

    def predict_ahead(self, layer: int, ranked: list[int]) -> None:
        """A guess made two layers ahead (``prefetch_ahead`` 2), prefetched like ``predict``'s, after it, without
        taking the spare of an expert the nearer guess holds, and only into an idle copy engine: copies are
        served in order, so a far guess must never delay a nearer one or a demand miss, and it is wrong more
        often (``bench/prefetch_reach``). When right, the nearer guess for the layer finds it on its way. Not
        scored for recall (the nearer guess for this layer comes later and replaces it)."""
        self._prefetch_top(layer, ranked, self._held, only_if_idle=True)

    def _prefetch_top(self, layer: int, ranked: list[int], held: set[ExpertKey],
                      only_if_idle: bool = False) -> set[ExpertKey]:
        """Prefetches the top ``prefetch`` of ``ranked`` that are not cached; returns their keys."""
        wanted = [ExpertKey(layer, e) for e in ranked[:self.prefetch]]  # most likely first
        missing = [key for key in wanted if not self.cache.contains(key)]
        if missing and only_if_idle and (self._prefetch_loads or not self.transfers.idle()):
            self.cache.counters.prefetch_ahead_skipped += 1
            missing = []
        if missing:
            keep = set(wanted) | held
            for key in missing:
                self._issue_prefetch(key, keep)
        self._pump()
        return set(wanted)

    def _issue_prefetch(self, key: ExpertKey, keep: set[ExpertKey]) -> None:
        manifest = self.manifests[key]
        got = self.cache.reserve_spare(key, manifest, keep)
        if got is None:
            return
        buf, reclaimed = got
        if reclaimed is not None and reclaimed in self._prefetch_loads:
            self._orphans.append(self._prefetch_loads.pop(reclaimed)[0])
        load = self.transfers.start(key, manifest, speculative=True)
        if load is None:  # no staging buffer free: skip rather than wait
            self.cache.release_spare(key)
            return
        self.cache.counters.prefetch_issued += 1
        self._prefetch_loads[key] = (load, buf)

    def settle(self) -> None:
        """Waits for every prefetch still on its way and lands it (counters final; tests, shutdown)."""
        for load in self._unlanded_prefetches():
            if load.future is not None:
                cf.wait([load.future])
        self._pump()

    def _unlanded_prefetches(self) -> list[Load]:
        return [ld for ld, _ in self._prefetch_loads.values()] + self._orphans

    def _pump(self) -> None:
        """Issues device copies for prefetches whose host part is done; drops orphans."""
        if not (self._prefetch_loads or self._orphans):
            return  # the usual case, between two graph replays: nothing in flight
        for load in [ld for ld in self._orphans if ld.ready()]:
            self._orphans.remove(load)
            self._discard(load)
        for key in [k for k, (ld, _) in self._prefetch_loads.items() if ld.ready()]:
            try:
                self._land_prefetch(key)
            except Exception as e:  # noqa: BLE001 - a failed guess costs nothing; a needed expert refetches
                log.warning("prefetch of %s failed: %s", key, e)

    def _land_prefetch(self, key: ExpertKey) -> None:
        """Makes sure a prefetched expert's copy into its spare buffer has been issued (waits if needed)."""
        entry = self._prefetch_loads.pop(key, None)
        if entry is None:
            return  # already landed
        load, buf = entry
        try:
            self.transfers.land(load, buf)
        except BaseException:
            self.cache.release_spare(key)
            raise

    def _discard(self, load: Load) -> None:
        try:
            self.transfers.land(load, None)
        except Exception:  # noqa: BLE001 - nobody needs this expert any more
            pass

    def _count_recall(self, layer: int, used: list[int], decode: bool) -> None:
        """Scores the guess for the layer and shows the planner its decode traffic."""
        if decode and self.planner is not None:
            self.planner.observe(layer, used)
        ranked = self._predicted.pop(layer, None)
        if ranked is None or not decode:
            return
        self.recall.used += len(used)
        for n in RECALL_TOP:
            self.recall.found[n] += sum(1 for e in ranked[:n] if e in used)  # ranked has no repeats

    # -- stats ---------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Cumulative counters (INTERFACE.md keys and extras)."""
        out = self.cache.counters.snapshot()
        out["bytes_fetched"] = self.transfers.bytes_fetched
        out["bytes_zero_copy"] = self.transfers.bytes_zero_copy
        out["prefetch_predicted"] = self.recall.used
        for n in RECALL_TOP:
            out[f"prefetch_found_top{n}"] = self.recall.found[n]
        return out

    def close(self) -> None:
        for load in self._unlanded_prefetches():
            self.transfers.drain([load])
        self._prefetch_loads.clear()
        self._orphans.clear()
