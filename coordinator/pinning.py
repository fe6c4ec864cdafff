"""Page-locking (``cudaHostRegister``) of co-located workers' shared memory, each byte at most once.

A copy from a registered mapping runs at DMA speed (55 GB/s on the H200, 7 GB/s from pageable memory).
CUDA pins whole pages, and registering a range that overlaps an already registered one fails and leaves a
sticky ``cudaErrorAlreadyMapped`` that torch reports at its next allocation (bench/NOTES.md, item 11). Host
views come in two shapes: a slice of one segment-wide tensor (RemoteSource: its storage is the segment, so the
whole segment is registered once), or a tensor over just one expert (InProcessSource, Ray objects: experts
packed next to each other share pages). ``HostRegistry`` therefore keeps the page-aligned ranges it
registered and registers only the pages of a request not covered yet, so no two registrations overlap.

Ranges are process-wide (CUDA's registration is), shared by every ``Transfers`` of the process through
``PROCESS_REGISTRY``: each owner ``release``s its ranges on close, and a range is unregistered when its last
owner is gone. An entry keeps a reference to the storage it covers, so the mapping cannot be unmapped (and
another mapping land at the same address) while CUDA still holds it pinned.

The bookkeeping is plain Python over integer addresses: ``register``/``unregister`` are injected, CUDA's by
default, so the logic is tested on CPU.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context (as torch does)
CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: for mappings without write permission
PAGE = 4096
log = logging.getLogger(__name__)

RegisterFn = Callable[[int, int], bool]
"""(address, nbytes) -> whether the range is now registered."""
UnregisterFn = Callable[[int], None]
"""address (a start previously registered) -> None."""


def clear_cuda_error() -> None:
    """A failed cudaHostRegister leaves the thread's last-error set, and torch's next kernel-launch check
    would report it; torch does not expose cudaGetLastError, so call the loaded runtime's directly."""
    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0", "libcudart.so"):
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue


def cuda_register(ptr: int, nbytes: int) -> bool:
    """cudaHostRegister, portable; read-only for mappings without write permission (Ray objects)."""
    cudart = torch.cuda.cudart()
    for flags in (CUDA_HOST_REGISTER_PORTABLE, CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_READ_ONLY):
        if int(cudart.cudaHostRegister(ptr, nbytes, flags)) == 0:
            return True
        clear_cuda_error()
    return False


def cuda_unregister(ptr: int) -> None:
    if int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0:
        clear_cuda_error()  # e.g. the process is shutting down; nothing else can be done


@dataclass(eq=False)
class Range:
    """One registered, page-aligned range [start, end)."""

    start: int
    """First byte (page-aligned)."""
    end: int
    """One past the last byte (page-aligned)."""
    owners: set[int] = field(default_factory=set)
    """Owner tokens (``id`` of a Transfers) still using it."""
    keep: list[object] = field(default_factory=list)
    """Storages this range covers, kept alive while it is registered."""


class HostRegistry:
    """Registered host ranges of this process; thread-safe."""

    def __init__(self, register: RegisterFn = cuda_register, unregister: UnregisterFn = cuda_unregister,
                 page: int = PAGE) -> None:
        self._register_fn = register
        self._unregister_fn = unregister
        self.page = page
        self.ranges: list[Range] = []  # sorted by start, pairwise disjoint
        self.failed = 0  # registrations CUDA refused (those pages are copied from pageable memory)
        self._lock = threading.Lock()

    def acquire(self, owner: int, ptr: int, nbytes: int, keep: object = None) -> bool:
        """Makes [ptr, ptr + nbytes) registered for ``owner``: registers only the pages no range covers yet.
        Returns whether every page of it is registered now."""
        if nbytes <= 0:
            return True
        lo = ptr - ptr % self.page
        hi = -(-(ptr + nbytes) // self.page) * self.page
        with self._lock:
            ok = True
            for start, end in self._gaps(lo, hi):
                if self._register_fn(start, end - start):
                    self._insert(Range(start, end))
                else:
                    ok = False
                    self.failed += 1
                    log.warning("could not cudaHostRegister %d bytes of shared memory; copying from pageable "
                                "memory", end - start)
            for r in self._overlapping(lo, hi):
                r.owners.add(owner)
                if keep is not None and not any(k is keep for k in r.keep):
                    r.keep.append(keep)
            return ok

    def release(self, owner: int) -> None:
        """Drops ``owner`` from every range; ranges nobody owns any more are unregistered."""
        with self._lock:
            kept = []
            for r in self.ranges:
                r.owners.discard(owner)
                if r.owners:
                    kept.append(r)
                else:
                    self._unregister_fn(r.start)
            self.ranges = kept

    def covered(self, ptr: int, nbytes: int) -> bool:
        """Whether every byte of [ptr, ptr + nbytes) lies in registered ranges."""
        with self._lock:
            return not list(self._gaps(ptr, ptr + nbytes))

    def overlaps(self, ptr: int, nbytes: int) -> bool:
        """Whether any byte of [ptr, ptr + nbytes) lies in a range of this registry."""
        with self._lock:
            return bool(self._overlapping(ptr, ptr + nbytes))

    def _overlapping(self, lo: int, hi: int) -> list[Range]:
        return [r for r in self.ranges if r.start < hi and lo < r.end]

    def _gaps(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Sub-ranges of [lo, hi) that no registered range covers, in order."""
        gaps, at = [], lo
        for r in self._overlapping(lo, hi):
            if r.start > at:
                gaps.append((at, r.start))
            at = max(at, r.end)
        if at < hi:
            gaps.append((at, hi))
        return gaps

    def _insert(self, new: Range) -> None:
        self.ranges.append(new)
        self.ranges.sort(key=lambda r: r.start)


PROCESS_REGISTRY = HostRegistry()
"""The one registry of this process (CUDA registrations are per process)."""


def pin_host_view(owner: int, host: torch.Tensor, registry: HostRegistry = PROCESS_REGISTRY) -> bool:
    """Registers the whole storage under ``host`` (a shm segment, or one expert's buffer) for ``owner``.
    Memory pinned by someone else (torch's pinned allocator) is left alone."""
    storage = host.untyped_storage()
    ptr, nbytes = storage.data_ptr(), storage.nbytes()
    if not registry.overlaps(ptr, nbytes) and host.is_pinned():
        return True
    return registry.acquire(owner, ptr, nbytes, keep=storage)
