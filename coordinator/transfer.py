"""Moving packed experts from the expert side into the cache's device buffers.

A load has a host part and a device part:

- host: ``ExpertSource.fetch_into`` (network, checksum) writes the expert into a staging buffer, on a small
  thread pool so several transfers are in flight; pinned memory on CUDA. A co-located worker's shared-memory
  view (``host_view``) needs no host part: it is copied from directly (and, on CUDA, registered with
  ``cudaHostRegister`` once per segment so the copy runs at pinned speed).
- device: one ``copy_`` into an arena row, issued by the engine thread only. On CUDA it runs on a side stream,
  ``non_blocking``, after the row's last reader finished (a ``free`` event recorded on the compute stream) and
  records a ``ready`` event the compute stream waits on before reading the row. On CPU the copy is plain and
  the events are absent, so the same code path runs.

Staging buffers are taken by the engine thread when a load is submitted; a load that finds none free waits
in a deferred queue until one is released, so pool threads never block on each other (no deadlock).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from coordinator.pinning import PROCESS_REGISTRY, pin_host_view
from expert_workers.format import ExpertKey, ExpertManifest
from expert_workers.source import ExpertSource

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Load:
    """One expert on its way to the device."""

    key: ExpertKey
    """Which expert."""
    manifest: ExpertManifest
    """Its manifest (from the source)."""
    host: torch.Tensor | None = None
    """Zero-copy view of a co-located worker's shared memory, when there is one."""
    staging: int | None = None
    """Index of the staging buffer the host part writes into (None while deferred or zero-copy)."""
    future: cf.Future[ExpertManifest] | None = None
    """The host part running on the pool."""
    landed: bool = False
    """The device copy has been issued."""

    def ready(self) -> bool:
        """Host part done (successfully or not): the device copy can be issued without blocking."""
        return self.host is not None or (self.future is not None and self.future.done())


class Transfers:
    """Staging, the fetch thread pool, the copy stream and per-buffer events for one ExpertCache arena."""

    def __init__(self, source: ExpertSource, arena: torch.Tensor, staging: int, workers: int,
                 timeout_s: float, zero_copy: bool = True) -> None:
        self.source = source
        self.zero_copy = zero_copy
        self.arena = arena
        self.cuda = arena.device.type == "cuda"
        self.timeout_s = timeout_s
        slot_bytes = arena.shape[1]
        self._staging = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(staging)]
        self._staging_free: list[int] = list(range(staging))
        self._staging_done: list[torch.cuda.Event | None] = [self._event() for _ in range(staging)]
        self._ready: list[torch.cuda.Event | None] = [self._event() for _ in range(arena.shape[0])]
        self._free: list[torch.cuda.Event | None] = [self._event() for _ in range(arena.shape[0])]
        # rows whose last copy the compute stream has not been ordered after yet (waiting twice is redundant,
        # and each wait is a few µs of host time between two graph replays)
        self._unwaited: set[int] = set()
        self._last_copy: torch.cuda.Event | None = None  # ``ready`` of the latest copy issued
        self._stream = torch.cuda.Stream(arena.device) if self.cuda else None
        # kernels read the arena on the device's default stream (the engine never switches streams); looking it
        # up once saves ~2 ms per Mixtral token of torch.cuda.current_stream calls
        self._compute = torch.cuda.current_stream(arena.device) if self.cuda else None
        self._pool = cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="expert-fetch")
        self._deferred: deque[Load] = deque()
        self._registered: set[int] = set()
        self.bytes_fetched = 0
        self.bytes_zero_copy = 0

    def _event(self) -> torch.cuda.Event | None:
        return torch.cuda.Event() if self.cuda else None

    # -- host part -----------------------------------------------------------------------------------
    def start(self, key: ExpertKey, manifest: ExpertManifest, speculative: bool = False) -> Load | None:
        """Begins loading ``key``. A speculative load (prefetch) that finds no staging buffer is not started
        (returns None); a demand load waits in the deferred queue instead."""
        host = self.source.host_view(key) if self.zero_copy else None
        if host is not None:
            self._register(host)
            return Load(key, manifest, host=host)
        load = Load(key, manifest)
        if self._staging_free:
            self._submit(load)
        elif speculative:
            return None
        else:
            self._deferred.append(load)
        return load

    def _submit(self, load: Load) -> None:
        load.staging = self._staging_free.pop()
        load.future = self._pool.submit(self._fetch, load.key, load.staging)

    def _fetch(self, key: ExpertKey, staging: int) -> ExpertManifest:
        done = self._staging_done[staging]
        if done is not None:
            done.synchronize()  # the previous device copy out of this staging buffer has finished
        return self.source.fetch_into(key, self._staging[staging], self.timeout_s)

    def _release(self, load: Load) -> None:
        if load.staging is not None:
            self._staging_free.append(load.staging)
            load.staging = None
        while self._deferred and self._staging_free:
            self._submit(self._deferred.popleft())

    def _register(self, host: torch.Tensor) -> None:
        """Pins a co-located worker's shm mapping (CUDA only), so copies from it run at DMA speed (55 GB/s
        instead of 7 from pageable memory). Each page is registered once per process (``coordinator.pinning``):
        an overlapping second registration would break the next CUDA allocation. Best effort: a mapping that
        cannot be registered is still copied from, just slower."""
        if not self.cuda:
            return
        ptr = host.untyped_storage().data_ptr()
        if ptr in self._registered:  # this storage was handled already: skip the registry's lock
            return
        self._registered.add(ptr)
        pin_host_view(id(self), host)

    def warm_zero_copy(self, keys: Sequence[ExpertKey]) -> int:
        """Before serving: maps and checksums every expert a co-located worker holds, and pins its segments,
        so no decode step pays for a first view (~9 ms per Mixtral expert) or a registration. Returns how many
        experts can be copied straight from shared memory."""
        verify = getattr(self.source, "verify_local", None)
        if not self.zero_copy or verify is None:
            return 0
        views = verify(keys)
        for view in views:
            self._register(view)
        return len(views)

    # -- waiting -------------------------------------------------------------------------------------
    def wait_any(self, loads: Sequence[Load]) -> Load:
        """The first of ``loads`` whose host part is done, waiting for one if none is. Callers include every
        unlanded load holding staging (prefetches too), so a deferred load always has one to wait behind."""
        while True:
            for load in loads:
                if load.ready():
                    return load
            futures = [ld.future for ld in loads if ld.future is not None]
            if not futures:
                raise RuntimeError("waiting on loads that were never submitted (no staging buffer free)")
            cf.wait(futures, return_when=cf.FIRST_COMPLETED)

    # -- device part ---------------------------------------------------------------------------------
    def land(self, load: Load, buffer: int | None) -> ExpertManifest:
        """Issues the device copy of a ready load into arena row ``buffer`` (None: discard it) and frees
        its staging buffer. Re-raises the host part's error (ExpertUnavailable, ...)."""
        assert not load.landed, f"{load.key} landed twice"
        load.landed = True
        try:
            if load.future is not None:
                load.manifest = load.future.result()
            if load.host is None:
                self.bytes_fetched += load.manifest.nbytes  # it crossed the transport, used or not
            if buffer is not None:
                src = load.host if load.host is not None else self._staging[load.staging]  # type: ignore[index]
                self._copy(src[:load.manifest.nbytes], buffer, load.staging)
                if load.host is not None:  # moved straight out of the worker's shared memory
                    self.bytes_fetched += load.manifest.nbytes
                    self.bytes_zero_copy += load.manifest.nbytes
        finally:
            self._release(load)
        return load.manifest

    def _copy(self, src: torch.Tensor, buffer: int, staging: int | None) -> None:
        dst = self.arena[buffer, :src.numel()]
        if self._stream is None:
            dst.copy_(src)
            return
        free, ready = self._free[buffer], self._ready[buffer]
        assert free is not None and ready is not None
        self._stream.wait_event(free)  # the last kernel reading the row's previous expert is done
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
        ready.record(self._stream)
        self._last_copy = ready
        self._unwaited.add(buffer)
        if staging is not None:
            done = self._staging_done[staging]
            assert done is not None
            done.record(self._stream)

    def idle(self) -> bool:
        """No device copy queued or running (copies run in issue order on one stream, so the latest one
        finishing means all have). Always on CPU, where a copy is done when ``land`` returns."""
        return self._last_copy is None or self._last_copy.query()

    def before_compute(self, buffer: int) -> None:
        """The compute stream waits until the row's copy has landed."""
        if buffer not in self._unwaited:
            return
        self._unwaited.discard(buffer)
        ready = self._ready[buffer]
        if ready is not None and self._compute is not None:
            self._compute.wait_event(ready)

    def after_compute(self, buffer: int) -> None:
        """Marks the row free for the next copy once the kernels queued so far have run."""
        free = self._free[buffer]
        if free is not None and self._compute is not None:
            free.record(self._compute)

    def drain(self, loads: Sequence[Load]) -> None:
        """After a failed step: lets every unlanded load finish and frees its staging (errors ignored)."""
        for load in loads:
            if load in self._deferred:
                self._deferred.remove(load)
                load.landed = True
                continue
            if not load.landed:
                if load.future is not None:
                    cf.wait([load.future])
                try:
                    self.land(load, None)
                except Exception:  # noqa: BLE001 - the step already failed with the first error
                    pass

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.cuda and self._registered:
            torch.cuda.synchronize(self.arena.device)  # no copy may still read a range being unregistered
            PROCESS_REGISTRY.release(id(self))
            self._registered.clear()
