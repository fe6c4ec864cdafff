"""Expert placements compared by the benchmark, all feeding the same kernels (coordinator.gpu_kernels):

- ``Resident``   (a) every expert in device memory; slots computed on the device, no host sync.
- ``Naive``      (b) experts in pageable CPU memory, the routed ones copied on use into 2 scratch slots;
                     no cache, no prefetch.
- ``LRU``        (c) mixtral-offloading style: per-layer LRU of k device slots, experts in pinned CPU memory,
                     misses copied on demand on the compute stream, no prefetch.
- ``Prefetch``   in-process reference for our data path: the same LRU + pinned memory, copies on a side
                     stream with per-slot events, and speculative prefetch of the next layer's experts
                     guessed by applying layer l+1's router to layer l's hidden state.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from bench.synth import ExpertBank


class _Counters:
    def __init__(self) -> None:
        self.uses = self.hits = self.misses = 0
        self.prefetch_issued = self.prefetch_used = 0
        self.bytes = 0
        self.guess_total = self.guess_right = 0

    def stats(self) -> dict[str, float]:
        return {"expert_uses": self.uses, "cache_hits": self.hits, "cache_misses": self.misses,
                "prefetch_issued": self.prefetch_issued, "prefetch_used": self.prefetch_used,
                "bytes_fetched": self.bytes,
                "hit_rate": self.hits / max(self.uses, 1),
                "prefetch_recall": self.guess_right / self.guess_total if self.guess_total else float("nan")}

    def reset(self) -> None:
        _Counters.__init__(self)


class Resident(_Counters):
    name = "a_resident"
    resident = True
    speculate = 0

    def __init__(self, bank: ExpertBank, device: str) -> None:
        super().__init__()
        self.slab = bank.host.to(device)

    def prepare(self, layer: int, ids: list[int], guess: list[int]) -> list[int]:  # pragma: no cover
        raise AssertionError("resident backends never prepare")

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "hit_rate": 1.0}


class Naive(_Counters):
    name = "b_naive"
    resident = False
    speculate = 0

    def __init__(self, bank: ExpertBank, device: str, top_k: int, experts: int) -> None:
        super().__init__()
        assert not bank.host.is_pinned(), "naive offload reads pageable memory"
        self.bank, self.E = bank, experts
        self.slab = torch.empty((top_k, bank.slot_bytes), dtype=torch.uint8, device=device)

    def prepare(self, layer: int, ids: list[int], guess: list[int]) -> list[int]:
        n = self.bank.expert_bytes
        for j, e in enumerate(ids):
            self.slab[j, :n].copy_(self.bank.host[layer * self.E + e, :n])   # pageable: synchronous
            self.uses += 1
            self.misses += 1
            self.bytes += n
        return list(range(len(ids)))


class LRU(_Counters):
    name = "c_lru_pinned"
    resident = False
    speculate = 0

    def __init__(self, bank: ExpertBank, device: str, k: int, layers: int, experts: int) -> None:
        super().__init__()
        assert bank.host.numel() == 0 or bank.host.is_pinned() or not torch.cuda.is_available(), \
            "LRU offload reads pinned memory"
        self.bank, self.k, self.E = bank, k, experts
        self.slab = torch.empty((layers * k, bank.slot_bytes), dtype=torch.uint8, device=device)
        # per layer: expert -> slot, least recently used first; slots start empty
        self.lru: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(layers)]
        self.free: list[list[int]] = [list(range(l * k, (l + 1) * k)) for l in range(layers)]

    def _slot_for(self, layer: int, e: int) -> tuple[int, bool]:
        """(slot, hit); on a miss the LRU victim's slot (or a free one) is claimed, not yet filled."""
        lru = self.lru[layer]
        if e in lru:
            lru.move_to_end(e)
            return lru[e], True
        slot = self.free[layer].pop() if self.free[layer] else lru.popitem(last=False)[1]
        lru[e] = slot
        return slot, False

    def prepare(self, layer: int, ids: list[int], guess: list[int]) -> list[int]:
        n = self.bank.expert_bytes
        slots = []
        for e in ids:
            slot, hit = self._slot_for(layer, e)
            self.uses += 1
            if hit:
                self.hits += 1
            else:
                self.misses += 1
                self.bytes += n
                self.slab[slot, :n].copy_(self.bank.host[layer * self.E + e, :n], non_blocking=True)
            slots.append(slot)
        return slots


class Prefetch(LRU):
    name = "p_lru_prefetch_inproc"

    def __init__(self, bank: ExpertBank, device: str, k: int, layers: int, experts: int, guesses: int = 2
                 ) -> None:
        super().__init__(bank, device, k, layers, experts)
        self.speculate = guesses
        self.copy_stream = torch.cuda.Stream(device=device)
        self.ready: dict[int, torch.cuda.Event] = {}          # slot -> copy-done event (pending)
        self.prefetched: set[tuple[int, int]] = set()          # (layer, expert) prefetched, not used yet

    def _fill(self, layer: int, e: int, slot: int) -> None:
        n = self.bank.expert_bytes
        with torch.cuda.stream(self.copy_stream):
            self.slab[slot, :n].copy_(self.bank.host[layer * self.E + e, :n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self.ready[slot] = ev
        self.bytes += n

    def prepare(self, layer: int, ids: list[int], guess: list[int]) -> list[int]:
        cur = torch.cuda.current_stream()
        slots = []
        for e in ids:
            slot, hit = self._slot_for(layer, e)
            self.uses += 1
            if hit:
                self.hits += 1
                if (layer, e) in self.prefetched:
                    self.prefetch_used += 1
                    self.prefetched.discard((layer, e))
            else:
                self.misses += 1
                self.prefetched.discard((layer, e))
                self._fill(layer, e, slot)
            ev = self.ready.pop(slot, None)
            if ev is not None:
                cur.wait_event(ev)
            slots.append(slot)
        if layer + 1 < len(self.lru) and guess:
            for e in guess:
                if e in self.lru[layer + 1]:
                    continue
                # the victim was last read a token ago (the host synced since), so overwriting is safe
                slot, _ = self._slot_for(layer + 1, e)
                self._fill(layer + 1, e, slot)
                self.prefetch_issued += 1
                self.prefetched.add((layer + 1, e))
        return slots

    def note_guess(self, layer: int, ids: list[int], guess: list[int]) -> None:
        """Counts how many routed experts of ``layer`` were among the guesses made one layer earlier."""
        self.guess_total += len(ids)
        self.guess_right += len(set(ids) & set(guess))


class WorkerShm(Prefetch):
    """The Prefetch data path fed from the real expert-worker processes: every expert is a zero-copy view of
    a worker's POSIX shared memory (``RemoteSource.host_view``), each segment cudaHostRegister'ed once, so
    copies run at pinned speed straight out of the other process's memory."""

    name = "d_inloop_workers_shm"

    def __init__(self, source: object, bank: ExpertBank, device: str, k: int, layers: int, experts: int,
                 guesses: int = 2) -> None:
        super().__init__(bank, device, k, layers, experts, guesses)
        from expert_workers.format import ExpertKey

        self.views = [source.host_view(ExpertKey(*divmod(i, experts))) for i in range(layers * experts)]  # type: ignore[attr-defined]
        if any(v is None for v in self.views):
            raise RuntimeError("a worker is not co-located: no shared-memory view")
        from coordinator.pinning import pin_host_view

        for v in self.views:  # each segment's pages once per process, owned by the source (coordinator.pinning)
            pin_host_view(id(source), v)
        self.unpinned_views = sum(not v.is_pinned() for v in self.views)

    def _fill(self, layer: int, e: int, slot: int) -> None:
        n = self.bank.expert_bytes
        with torch.cuda.stream(self.copy_stream):
            self.slab[slot, :n].copy_(self.views[layer * self.E + e][:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self.ready[slot] = ev
        self.bytes += n
