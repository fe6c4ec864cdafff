"""``InProcessSource``: the ExpertSource over ExpertStore objects living in this process (tests, benchmarks)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence

import torch

from expert_workers.format import ExpertKey, ExpertLayout, ExpertManifest, checksum
from expert_workers.source import ExpertNotFound, ExpertUnavailable
from expert_workers.store import ExpertStore, WorkerNotReady


def _check_compatible(stores: Sequence[ExpertStore]) -> None:
    first = stores[0]
    for s in stores[1:]:
        if s.fingerprint != first.fingerprint or s.spec != first.spec:
            raise ValueError(f"stores serve different models or settings: shard {first.shard} has "
                             f"{first.fingerprint[:8]} {first.spec}, shard {s.shard} has {s.fingerprint[:8]} {s.spec}")


class InProcessSource:
    """Serves experts straight from in-process stores. Replicas (several stores holding one key) are tried in
    order; a store that is not ready or whose buffer fails its checksum is skipped."""

    def __init__(self, stores: Sequence[ExpertStore]) -> None:
        if not stores:
            raise ValueError("InProcessSource needs at least one ExpertStore")
        self._stores = list(stores)
        _check_compatible(self._stores)
        self._layout = self._stores[0].layout
        self._replicas: dict[ExpertKey, list[ExpertStore]] = {}
        for s in self._stores:
            for k in s.keys():
                self._replicas.setdefault(k, []).append(s)
        missing = [k for k in self._layout.all_keys() if k not in self._replicas]
        if missing:
            raise ValueError(f"the stores do not cover {len(missing)} experts, e.g. {missing[0]}")
        self._lock = threading.Lock()
        self._stats = {"bytes_fetched": 0.0, "fetches": 0.0, "zero_copy_reads": 0.0, "checksum_failures": 0.0,
                       "failovers": 0.0}
        self._verified: set[tuple[int, ExpertKey]] = set()

    def _count(self, name: str, n: float = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def layout(self) -> ExpertLayout:
        return self._layout

    def _candidates(self, key: ExpertKey) -> list[ExpertStore]:
        try:
            return self._replicas[key]
        except KeyError:
            raise ExpertNotFound(f"no store holds expert {key}") from None

    def manifest(self, key: ExpertKey) -> ExpertManifest:
        for s in self._candidates(key):
            if s.ready:
                return s.manifest(key)
        raise ExpertUnavailable(f"no ready store holds expert {key}")

    def fetch_into(self, key: ExpertKey, out: torch.Tensor, timeout_s: float | None = None) -> ExpertManifest:
        """Copies the expert into ``out`` and verifies the copy's checksum (tries the next replica on failure)."""
        for i, s in enumerate(self._candidates(key)):
            if i:
                self._count("failovers")
            try:
                m = s.manifest(key)
                if out.dtype != torch.uint8 or out.device.type != "cpu" or out.numel() < m.nbytes:
                    raise ValueError(f"out must be a CPU uint8 tensor of at least {m.nbytes} bytes for {key}, "
                                     f"got {out.dtype} {out.device} x{out.numel()}")
                dst = out[:m.nbytes]
                dst.copy_(self._as_tensor(s.buffer(key)))
            except WorkerNotReady:
                continue
            if checksum(dst) != m.checksum:
                self._count("checksum_failures")
                continue
            self._count("fetches")
            self._count("bytes_fetched", m.nbytes)
            return m
        raise ExpertUnavailable(f"no store could serve expert {key} intact")

    def host_view(self, key: ExpertKey) -> torch.Tensor | None:
        """A zero-copy CPU uint8 tensor over the store's buffer (checksum verified on first use)."""
        for s in self._candidates(key):
            if not s.ready:
                continue
            m, view = s.manifest(key), self._as_tensor(s.buffer(key))
            tag = (id(s), key)
            if tag not in self._verified:
                if checksum(view) != m.checksum:
                    self._count("checksum_failures")
                    continue
                self._verified.add(tag)
            self._count("zero_copy_reads")
            return view
        return None

    @staticmethod
    def _as_tensor(buf: object) -> torch.Tensor:
        with warnings.catch_warnings():  # Ray's buffers are read-only; the view is only ever read
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(buf)  # type: ignore[arg-type]

    def stats(self) -> dict[str, float]:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """The stores belong to the caller; nothing to release here."""
