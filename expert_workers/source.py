"""What the coordinator needs from the expert side: the ``ExpertSource`` protocol.

Two implementations sit behind ``make_source`` (vLLM-style transport factory):

- ``InProcessSource``: wraps plain ``ExpertStore`` objects in this process (unit tests, benchmarks).
- ``RemoteSource`` (expert_workers.fetch): talks gRPC to worker processes; reads co-located workers'
  shared memory zero-copy; verifies checksums; fails over between replicas.

Errors the coordinator handles are the ones below, whatever the transport.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from expert_workers.format import ExpertKey, ExpertLayout, ExpertManifest


class ExpertUnavailable(RuntimeError):
    """No live replica could serve the expert (all down, all timed out, all corrupt)."""


class ExpertNotFound(KeyError):
    """No worker holds this (layer, expert)."""


class ExpertSource(Protocol):
    """Where experts come from. Implementations are thread-safe."""

    def layout(self) -> ExpertLayout:
        """Number of layers/experts and FFN shapes of the model the workers serve."""
        ...

    def manifest(self, key: ExpertKey) -> ExpertManifest:
        """The manifest of one expert (cheap after the first call: cached)."""
        ...

    def fetch_into(self, key: ExpertKey, out: torch.Tensor, timeout_s: float | None = None) -> ExpertManifest:
        """Copies the packed expert into ``out`` (a CPU uint8 tensor, usually pinned, of at least
        ``manifest(key).nbytes``), verifies its checksum and returns its manifest. Raises
        ExpertUnavailable / ExpertNotFound."""
        ...

    def host_view(self, key: ExpertKey) -> torch.Tensor | None:
        """A zero-copy CPU uint8 view of the packed expert in a co-located worker's shared memory
        (checksum verified once), or None when the expert is only reachable over the network."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters: bytes_fetched, remote_fetches, zero_copy_reads, checksum_failures, failovers, ..."""
        ...

    def close(self) -> None:
        """Releases channels and shared-memory mappings."""
        ...


def make_source(workers: Sequence[str] | None = None, stores: Sequence[object] | None = None,
                **options: object) -> ExpertSource:
    """``workers`` (HOST:PORT addresses) -> RemoteSource; ``stores`` (ExpertStore objects) -> InProcessSource."""
    if (workers is None) == (stores is None):
        raise ValueError("give exactly one of workers= or stores=")
    if stores is not None:
        from expert_workers.inprocess import InProcessSource

        return InProcessSource(list(stores))
    from expert_workers.fetch import RemoteSource

    return RemoteSource(list(workers or ()), **options)  # type: ignore[arg-type]
