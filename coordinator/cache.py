"""The hot expert cache: a per-layer LRU over preallocated device buffers, plus spare prefetch buffers.

All slots live in one device ``arena`` of shape ``[buffers, slot_bytes]`` (uint8): row ``b`` is one contiguous
buffer big enough for the largest packed expert, so loading an expert is one copy and computing reads
zero-copy views of the row. Buffers are fungible: each layer owns a number of them (its LRU entries plus
free ones; ``k`` or ``k + 1`` when the memory budget is spread over the layers, then as
``coordinator.partition`` plans from the traffic, moved by ``repartition`` between steps) and the spare pool
owns the rest. A prefetch fills a spare and evicts nothing; when the
prefetched expert is used, its buffer joins the layer's LRU and the layer hands its least recently used
buffer back to the spare pool (a swap of ownership, not a copy).

Which entry a full layer evicts: the least recently used (``eviction="lru"``, mixtral-offloading's policy) or
the one with the least recency-weighted use count (``"lrfu"``, Lee et al. 2001, the coordinator's default):
each use of an expert adds 1 to its worth, and the worth decays by ``LRFU_DECAY`` per step of its layer, so an
expert the layer keeps coming back to is not pushed out by a one-off. Worth is kept for evicted experts too.

This class is pure bookkeeping over buffer ids; copies and CUDA events live in ``coordinator.transfer``.
It is used from one thread (the engine's).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from coordinator.config import EVICTIONS
from expert_workers.format import ExpertKey, ExpertManifest, tensor_views


def spread_slots(total: int, layers: int) -> list[int]:
    """``total`` cache slots over ``layers`` layers: ``total // layers`` each, and the remainder one more each
    in layers spaced evenly over the depth (no layer is known to miss more before the traffic is seen)."""
    k, extra = divmod(total, layers)
    return [k + ((i + 1) * extra // layers - i * extra // layers) for i in range(layers)]


def describe_slots(layer_slots: Sequence[int]) -> str:
    """"3 x 27 layers, 2 x 5 layers" for a log line."""
    counts = sorted({n: layer_slots.count(n) for n in layer_slots}.items(), reverse=True)
    return ", ".join(f"{n} x {c} layer{'s' * (c != 1)}" for n, c in counts)


LRFU_DECAY = 0.95
"""Per step of the layer: a use 14 steps ago weighs half a use now. On code-moe-22m's held-out trace LRFU hits
0.768 / 0.880 at k = 3 / 4 against LRU's 0.730 / 0.861 (tests/test_cache.py; Belady about 0.79 / 0.90); a
decay of 0.8 or 0.9 measured 0.5 and 0.1 points less at k = 3."""


@dataclass
class LayerCounters:
    """Lookups of one layer's cache."""

    hits: int = 0
    """Used experts found resident (LRU or a prefetched spare)."""
    misses: int = 0
    """Used experts that had to be fetched on demand."""


@dataclass
class CacheCounters:
    """Cumulative counters; ``uses == hits + misses`` by construction."""

    layers: list[LayerCounters] = field(default_factory=list)
    """Per layer."""
    prefetch_issued: int = 0
    """Prefetch loads started (predicted experts that were not cached); counted by the caller."""
    prefetch_used: int = 0
    """Prefetched experts later used while still in their spare buffer (counted as hits too)."""
    prefetch_ahead_skipped: int = 0
    """Guesses two layers ahead not prefetched because the copy engine was busy; counted by the caller."""
    slots_moved: int = 0
    """Buffers ``ExpertCache.repartition`` moved from one layer to another."""
    not_admitted: int = 0
    """Misses and used prefetched experts kept out of the LRU by admission (held in a spare instead)."""

    @property
    def hits(self) -> int:
        return sum(c.hits for c in self.layers)

    @property
    def misses(self) -> int:
        return sum(c.misses for c in self.layers)

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {"expert_uses": self.hits + self.misses, "cache_hits": self.hits,
                                 "cache_misses": self.misses, "prefetch_issued": self.prefetch_issued,
                                 "prefetch_used": self.prefetch_used,
                                 "prefetch_ahead_skipped": self.prefetch_ahead_skipped,
                                 "cache_slots_moved": self.slots_moved, "cache_not_admitted": self.not_admitted}
        for i, c in enumerate(self.layers):
            out[f"layer{i}_hits"] = c.hits
            out[f"layer{i}_misses"] = c.misses
        return out


@dataclass(frozen=True)
class Lookup:
    """Where a needed expert is right now."""

    expert: int
    """Expert index within the layer."""
    buffer: int | None
    """Arena row holding it, or None for a miss."""
    prefetched: bool = False
    """True when it sits in a spare buffer filled by prefetch (possibly still in flight)."""


class ExpertCache:
    """Per-layer caches of ``slots`` experts (one count for every layer, or one per layer; kept in recency
    order, evicting by ``eviction``) plus ``spares`` prefetch buffers, in one device arena."""

    def __init__(self, num_layers: int, slots: int | Sequence[int], spares: int, slot_bytes: int,
                 device: torch.device, eviction: str = "lru", admission: bool = False) -> None:
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
        self.eviction = eviction
        self.admission = admission
        """Used prefetched experts join the LRU only when ``admits`` says so (the runner asks it for misses)."""
        self._clock = [0] * num_layers  # steps each layer has seen (lookups), for LRFU's decay
        self._worth: list[dict[int, tuple[float, int]]] = [{} for _ in range(num_layers)]  # expert -> (worth, at)
        self.layer_slots = [slots] * num_layers if isinstance(slots, int) else list(slots)
        """LRU slots of each layer."""
        if len(self.layer_slots) != num_layers or min(self.layer_slots) < 1:
            raise ValueError(f"the expert cache needs at least 1 slot in each of {num_layers} layers, got {slots}")
        self.num_layers = num_layers
        self.slots_per_layer = min(self.layer_slots)
        """The smallest layer's slot count (k): what a step may rely on in every layer."""
        self.slot_bytes = slot_bytes
        ends = list(itertools.accumulate(self.layer_slots))
        n = ends[-1] + spares
        self.arena = torch.empty((n, slot_bytes), dtype=torch.uint8, device=device)
        self.manifests: dict[int, ExpertManifest] = {}  # buffer -> manifest of what it holds (or is loading)
        self._lru: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(num_layers)]  # expert -> buffer
        self._free: list[list[int]] = [list(range(end - k, end)) for k, end in zip(self.layer_slots, ends)]
        self._spare_free: list[int] = list(range(ends[-1], n))
        self._prefetched: OrderedDict[ExpertKey, int] = OrderedDict()  # oldest first
        self._prefetch_unused: set[ExpertKey] = set()  # prefetched and not used yet (prefetch_used once each)
        self.counters = CacheCounters(layers=[LayerCounters() for _ in range(num_layers)])

    @property
    def nbytes(self) -> int:
        return self.arena.numel()

    # -- lookups -------------------------------------------------------------------------------------
    def lookup(self, layer: int, experts: Iterable[int]) -> list[Lookup]:
        """Classifies the experts one step needs, counts hits/misses and marks the resident ones most
        recently used (a token's experts are looked up together, as in the README's measurement)."""
        found: list[Lookup] = []
        counters = self.counters.layers[layer]
        self._clock[layer] += 1
        for e in experts:
            if e in self._lru[layer]:
                self._lru[layer].move_to_end(e)
                self._used(layer, e)
                found.append(Lookup(e, self._lru[layer][e]))
                counters.hits += 1
            elif (buf := self._prefetched.get(ExpertKey(layer, e))) is not None:
                found.append(Lookup(e, buf, prefetched=True))
                counters.hits += 1
                if ExpertKey(layer, e) in self._prefetch_unused:
                    self._prefetch_unused.discard(ExpertKey(layer, e))
                    self.counters.prefetch_used += 1
            else:
                found.append(Lookup(e, None))
                counters.misses += 1
        return found

    def touch_resident(self, layer: int, experts: list[int]) -> list[int] | None:
        """The decode fast path: when every one of ``experts`` is in the layer's LRU, marks them most recently
        used, counts the hits and returns their buffers; otherwise changes nothing and returns None."""
        lru = self._lru[layer]
        if not all(e in lru for e in experts):
            return None
        self._clock[layer] += 1
        for e in experts:
            lru.move_to_end(e)
            self._used(layer, e)
        self.counters.layers[layer].hits += len(experts)
        return [lru[e] for e in experts]

    def contains(self, key: ExpertKey) -> bool:
        return key.expert in self._lru[key.layer] or key in self._prefetched

    def resident(self, layer: int) -> list[int]:
        """The layer's LRU entries, least recently used first."""
        return list(self._lru[layer])

    # -- eviction ------------------------------------------------------------------------------------
    def _used(self, layer: int, expert: int) -> None:
        """One more use of ``expert`` at the layer's current step (LRFU's worth; LRU needs only the order)."""
        if self.eviction == "lrfu":
            worth, at = self._worth[layer].get(expert, (0.0, 0))
            now = self._clock[layer]
            self._worth[layer][expert] = (worth * LRFU_DECAY ** (now - at) + 1.0, now)

    def _victim(self, layer: int, protect: set[int]) -> int | None:
        """The entry of ``layer`` to evict among those not in ``protect``: the least recently used, or (LRFU)
        the least worth, the least recently used among equals. None when every entry is protected."""
        candidates = [e for e in self._lru[layer] if e not in protect]  # least recently used first
        if not candidates or self.eviction == "lru":
            return candidates[0] if candidates else None
        return min(candidates, key=lambda e: self._decayed(layer, e))

    def _decayed(self, layer: int, expert: int) -> float:
        worth, at = self._worth[layer].get(expert, (0.0, self._clock[layer]))
        return worth * LRFU_DECAY ** (self._clock[layer] - at)

    # -- admission -----------------------------------------------------------------------------------
    def admits(self, layer: int, expert: int, protect: set[int]) -> bool:
        """Whether a missed ``expert`` should take a place in the layer (admission, as TinyLFU puts it in front
        of a cache): always with a free buffer or under LRU; under LRFU only when its worth counting this use
        exceeds the worth of the entry it would evict, so a one-off does not push out an expert the layer
        keeps using. A caller that does not admit holds the expert elsewhere for its step (``ExpertRunner``: in a
        spare buffer, like a prefetched expert) and calls ``remember``. On the bench model's routing it saves
        10-12% of the loads at every budget (``bench.cache_bound``). On by default: ``CoordinatorConfig.admission``."""
        if self.eviction != "lrfu" or self._free[layer]:
            return True
        victim = self._victim(layer, protect)
        return victim is None or self._decayed(layer, expert) + 1.0 > self._decayed(layer, victim)

    def remember(self, layer: int, expert: int) -> None:
        """Counts a use of an expert that was computed but not admitted: its worth grows toward admission, and
        ``counters.not_admitted`` by one."""
        self._used(layer, expert)
        self.counters.not_admitted += 1

    def take_victim(self, layer: int, protect: set[int]) -> int:
        """A buffer of ``layer`` to load into: a free one, else the buffer of the entry the eviction policy
        picks among those not in ``protect`` (experts this step still has to compute), which is evicted."""
        if self._free[layer]:
            return self._free[layer].pop()
        victim = self._victim(layer, protect)
        if victim is None:
            raise RuntimeError(f"layer {layer}: every cache slot holds an expert still needed this step")
        return self._lru[layer].pop(victim)

    def insert(self, layer: int, expert: int, buffer: int, manifest: ExpertManifest) -> None:
        """Records ``expert`` as most recently used in ``buffer`` (one obtained from take_victim)."""
        self._lru[layer][expert] = buffer
        self._used(layer, expert)
        self.manifests[buffer] = manifest

    def promote(self, layer: int, expert: int, protect: set[int]) -> None:
        """A used prefetched expert joins the layer's LRU: its spare buffer changes owner, and the layer
        gives one of its buffers (free, or its LRU victim) to the spare pool in exchange."""
        key = ExpertKey(layer, expert)
        if self.admission and not self.admits(layer, expert, protect):
            self.remember(layer, expert)  # stays in its spare (newest now) until a prefetch reclaims it
            self._prefetched.move_to_end(key)
            return
        spare = self._prefetched.pop(key)
        try:
            given = self.take_victim(layer, protect)
        except RuntimeError:  # every slot still needed this step: keep it as a prefetched spare for now
            self._prefetched[key] = spare
            return
        self._lru[layer][expert] = spare
        self._used(layer, expert)
        self.manifests.pop(given, None)
        self._spare_free.append(given)

    def repartition(self, targets: Sequence[int]) -> int:
        """Moves buffers so that layer l owns ``targets[l]`` (same total; ``coordinator.partition`` plans
        them). A shrinking layer gives its free buffers first, then the experts its eviction policy picks,
        which are evicted; prefetch spares are not touched. Between two steps only: nothing may be loading into a
        layer's buffers. A row still read by queued kernels is safe: its next copy waits for them
        (``Transfers``). Returns how many buffers moved."""
        if len(targets) != self.num_layers or sum(targets) != sum(self.layer_slots) or min(targets) < 1:
            raise ValueError(f"targets {list(targets)} must give {self.num_layers} layers >= 1 slot each, "
                             f"{sum(self.layer_slots)} in all")
        given: list[int] = []
        for layer, want in enumerate(targets):
            while self.layer_slots[layer] > want:
                if self._free[layer]:
                    given.append(self._free[layer].pop())
                else:
                    buf = self._lru[layer].pop(self._victim(layer, set()))  # type: ignore[arg-type]
                    self.manifests.pop(buf, None)
                    given.append(buf)
                self.layer_slots[layer] -= 1
        moved = len(given)
        for layer, want in enumerate(targets):
            while self.layer_slots[layer] < want:
                self._free[layer].append(given.pop())
                self.layer_slots[layer] += 1
        self.slots_per_layer = min(self.layer_slots)
        self.counters.slots_moved += moved
        return moved

    # -- prefetch spares -----------------------------------------------------------------------------
    def reserve_spare(self, key: ExpertKey, manifest: ExpertManifest, keep: set[ExpertKey],
                      prefetch: bool = True) -> tuple[int, ExpertKey | None] | None:
        """A spare buffer for prefetching ``key``: a free one, else the one of the oldest prefetched expert
        not in ``keep`` (returned second: its load, if still in flight, must be discarded). None when no
        spare can be given (the prefetch is skipped, never waited for). ``prefetch=False``: a demand miss
        admission kept out of the LRU, held like a prefetched expert but never counted as one."""
        reclaimed = None
        if self._spare_free:
            buf = self._spare_free.pop()
        else:
            reclaimed = next((k for k in self._prefetched if k not in keep), None)
            if reclaimed is None:
                return None
            buf = self._prefetched.pop(reclaimed)
            self._prefetch_unused.discard(reclaimed)
        self._prefetched[key] = buf
        if prefetch:
            self._prefetch_unused.add(key)
        self.manifests[buf] = manifest
        return buf, reclaimed

    def release_spare(self, key: ExpertKey) -> None:
        """Drops a prefetch whose load failed."""
        buf = self._prefetched.pop(key, None)
        self._prefetch_unused.discard(key)
        if buf is not None:
            self.manifests.pop(buf, None)
            self._spare_free.append(buf)

    def free_buffer(self, layer: int, buffer: int) -> None:
        """Returns a buffer taken with take_victim whose load failed (its old content is gone)."""
        self.manifests.pop(buffer, None)
        self._free[layer].append(buffer)

    def holder(self, buffer: int) -> ExpertKey | None:
        """Which expert a buffer is assigned to right now (None when free)."""
        m = self.manifests.get(buffer)
        return m.key if m is not None else None

    # -- compute -------------------------------------------------------------------------------------
    def views(self, buffer: int) -> dict[str, dict[str, torch.Tensor]]:
        """Typed zero-copy views of the packed expert in ``buffer``."""
        return tensor_views(self.arena[buffer], self.manifests[buffer])

    def check(self) -> None:
        """Invariants (used by tests): every buffer has exactly one owner."""
        owned = [b for lru in self._lru for b in lru.values()] + [b for f in self._free for b in f]
        owned += list(self._prefetched.values()) + self._spare_free
        if sorted(owned) != list(range(self.arena.shape[0])):
            raise AssertionError(f"cache buffers lost or shared: {sorted(owned)}")
        for layer in range(self.num_layers):
            n = len(self._lru[layer]) + len(self._free[layer])
            if n != self.layer_slots[layer]:
                raise AssertionError(f"layer {layer} owns {n} buffers, expected {self.layer_slots[layer]}")
