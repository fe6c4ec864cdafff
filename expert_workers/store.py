"""``ExpertStore``: one shard of a model's experts, quantized, cached on disk and held in shared CPU RAM.

The plain core object of an expert worker (no gRPC, no Ray): the gRPC servicer, the Ray actor and
``InProcessSource`` are thin shells around it.

Life cycle::

    store = ExpertStore("path/to/mixtral", "1/3", INT2)   # cheap: reads config + safetensors headers
    store.load()        # quantize (or reuse the disk cache), place every expert in one shm segment
    store.buffer(key)   # zero-copy uint8 view of one packed expert
    store.close()       # unlink the segment

Sharding (DESIGN.md): experts are flattened as ``idx = layer * num_experts + expert``; shard ``I/N`` owns
``idx % N == I``. Storage: ``"shm"`` puts all experts into one POSIX shared-memory segment named
``moe-<fingerprint[:8]>-s<I>of<N>-<pid>`` that co-located readers map; ``"ray"`` puts each expert into the Ray
object store (``ray.put`` of a numpy array, zero-copy for readers on the node).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from expert_workers.cache import CacheIndex, ShardCache, page_align
from expert_workers.checkpoint import Checkpoint, open_checkpoint
from expert_workers.format import (INT2, ExpertKey, ExpertLayout, ExpertManifest, QuantSpec, checksum,
                                   pack_expert, quant_fingerprint)
from expert_workers.source import ExpertNotFound

log = logging.getLogger(__name__)

STORAGES = ("shm", "ray")


class WorkerNotReady(RuntimeError):
    """The store is still loading (gRPC: UNAVAILABLE)."""


def host_id() -> str:
    """Identifies this machine (boot id + hostname): equal values mean a reader can map our shm."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{boot}@{socket.gethostname()}"


@dataclass(frozen=True)
class ShardSpec:
    """Which experts a worker owns: ``idx % count == index`` with ``idx = layer * num_experts + expert``."""

    index: int
    """I, 0-based."""
    count: int
    """N, the number of shards."""

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index}/{self.count} is invalid: need 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """``"1/3"`` -> ShardSpec(1, 3)."""
        try:
            i, n = text.split("/")
            return cls(int(i), int(n))
        except ValueError as e:
            raise ValueError(f"shard must look like I/N (e.g. 0/2), got {text!r}: {e}") from None

    def owns(self, key: ExpertKey, num_experts: int) -> bool:
        return (key.layer * num_experts + key.expert) % self.count == self.index

    def keys(self, layout: ExpertLayout) -> list[ExpertKey]:
        """This shard's experts, in flattened-index order."""
        return [k for k in layout.all_keys() if self.owns(k, layout.num_experts)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class StoreInfo:
    """What a worker is and holds (the GetInfo RPC)."""

    worker_id: str
    """Unique per process start: "host:pid:shard[:replica]"."""
    host_id: str
    """Equal for processes on one host (decides co-location)."""
    pid: int
    """Worker process id."""
    model_fingerprint: str
    """Source checkpoint fingerprint; every worker of one deployment must agree."""
    shard: ShardSpec
    """Which experts."""
    replica: int
    """Which copy of the shard."""
    spec: QuantSpec
    """Quantization settings."""
    layout: ExpertLayout
    """Model shape."""
    experts: tuple[ExpertKey, ...]
    """The experts held."""
    ready: bool
    """False while loading."""
    bytes_held: int
    """Bytes of packed experts held in shared memory / the object store."""
    storage: str
    """"shm" or "ray"."""


@dataclass(frozen=True)
class ExpertHandle:
    """Where a co-located reader finds one expert without a copy through a socket."""

    host_id: str
    """The worker's host; only readers with the same host_id may use the handle."""
    shm_name: str
    """POSIX shared-memory segment ("" under Ray)."""
    ray_object_id: str
    """Hex Ray ObjectID of the expert's numpy array ("" for shm)."""
    offset: int
    """Start of the expert in the segment (0 for a Ray object)."""
    length: int
    """Bytes of the expert."""
    segment_bytes: int
    """Size of the whole segment (map it once, whole)."""
    manifest: ExpertManifest
    """Its manifest."""


class ExpertStore:
    """One shard of experts, quantized with hqq, cached on disk, held in shm (or the Ray object store).

    Thread-safe after ``load()``. ``quant_device`` "auto" quantizes on CUDA when present (one Mixtral expert
    takes about 4 minutes on 2 CPU cores, 81 s per 14336x4096 matrix); on CPU, see ``_quantize``.
    """

    def __init__(self, model: str | os.PathLike[str] | Checkpoint, shard: ShardSpec | str = "0/1",
                 spec: QuantSpec = INT2, *, replica: int = 0, cache_dir: str | os.PathLike[str] | None = None,
                 storage: str = "shm", progress: bool = True, quant_device: str = "auto") -> None:
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
        self.shard = shard if isinstance(shard, ShardSpec) else ShardSpec.parse(shard)
        self.spec, self.replica, self.storage, self.progress = spec, replica, storage, progress
        self.quant_device = ("cuda" if torch.cuda.is_available() else "cpu") if quant_device == "auto" else quant_device
        self.layout = self.checkpoint.layout
        self.fingerprint = self.checkpoint.fingerprint
        self.quant_fingerprint = quant_fingerprint(self.fingerprint, spec)
        self._keys = self.shard.keys(self.layout)
        root = Path(cache_dir) if cache_dir is not None else _default_cache_root()
        self._cache = ShardCache(root, self.quant_fingerprint, f"shard-{self.shard.index}of{self.shard.count}")
        self._host_id, self._pid = host_id(), os.getpid()
        self._entries: dict[ExpertKey, tuple[int, ExpertManifest]] = {}
        self._views: dict[ExpertKey, np.ndarray] = {}
        self._refs: dict[ExpertKey, Any] = {}
        self._shm: shared_memory.SharedMemory | None = None
        self._segment: np.ndarray | None = None
        self._ready = threading.Event()
        self._load_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats: dict[str, float] = {"fetches": 0, "bytes_sent": 0, "handles": 0, "errors": 0,
                                         "load_seconds": 0, "quantized_experts": 0, "cache_reused": 0,
                                         "cache_repaired_experts": 0}

    # ---- loading -------------------------------------------------------------------------------------------
    def load(self) -> ExpertStore:
        """Quantizes this shard (or reuses the disk cache), places it in memory and marks the store ready.
        Idempotent; safe to call from a background thread while a server already answers UNAVAILABLE."""
        with self._load_lock:
            if self._ready.is_set():
                return self
            t0 = time.monotonic()
            settings = {**self.spec.as_dict(), "shard": [self.shard.index, self.shard.count]}
            with self._cache.locked():
                index, why = self._cache.read_index(self.fingerprint, self.checkpoint.stamp(), settings, self._keys)
                if index is None:
                    log.info("shard %s: quantizing %d experts to %d bits (cache miss: %s)", self.shard,
                             len(self._keys), self.spec.bits, why)
                    index = self._build(settings)
                else:
                    log.info("shard %s: reusing quantized cache %s (%d experts, %.1f MB)", self.shard,
                             self._cache.data_path, len(index.entries), index.data_bytes / 1e6)
                    self._stats["cache_reused"] = 1
                self._place(index)
            self._stats["load_seconds"] = time.monotonic() - t0
            self._ready.set()
            log.info("shard %s ready: %d experts, %.1f MB in %s", self.shard, len(self._keys),
                     self.bytes_held / 1e6, self.storage)
            return self

    def _quantize(self, keys: list[ExpertKey], desc: str) -> Iterator[tuple[np.ndarray, ExpertManifest]]:
        """Packs each expert with hqq, in key order, reading weights from the checkpoint as they are needed.

        On CPU, experts are quantized on a small thread pool with torch's intra-op threads set to 1: hqq's many
        small elementwise ops scale badly across threads (measured on 2 busy cores: 16 experts of 384x256 take
        12.2 s sequentially with 2 intra-op threads, 8.7 s with 1, 2.3 s on 2 pool threads with 1 each). At most
        ``workers + 1`` experts are in memory at once."""
        bar = tqdm(total=len(keys), desc=desc, unit="expert", disable=not self.progress)
        on_cpu = self.quant_device == "cpu"
        workers = max(1, min(os.cpu_count() or 1, 8)) if on_cpu else 1
        saved_threads = torch.get_num_threads()
        pending: deque[cf.Future[tuple[np.ndarray, ExpertManifest]]] = deque()
        try:
            if on_cpu:
                torch.set_num_threads(1)  # process-wide, only while loading; restored below
            with cf.ThreadPoolExecutor(workers, thread_name_prefix="quantize") as pool:
                for key, weights in self.checkpoint.iter_experts(keys):
                    pending.append(pool.submit(self._pack, key, weights))
                    if len(pending) > workers:
                        yield self._done(pending.popleft(), bar)
                while pending:
                    yield self._done(pending.popleft(), bar)
        finally:
            for f in pending:
                f.cancel()
            torch.set_num_threads(saved_threads)
            bar.close()

    def _pack(self, key: ExpertKey, weights: dict[str, torch.Tensor]) -> tuple[np.ndarray, ExpertManifest]:
        weights = {m: w.to(self.quant_device) for m, w in weights.items()}
        return pack_expert(key, weights, self.spec, self.quant_fingerprint)

    def _done(self, future: cf.Future[tuple[np.ndarray, ExpertManifest]], bar: tqdm) -> tuple[np.ndarray, ExpertManifest]:
        result = future.result()
        with self._stats_lock:
            self._stats["quantized_experts"] += 1
        bar.update(1)
        return result

    def _build(self, settings: dict[str, Any]) -> CacheIndex:
        with self._cache.writer(self.fingerprint, self.checkpoint.stamp(), settings) as writer:
            for buf, manifest in self._quantize(self._keys, f"quantizing shard {self.shard}"):
                writer.add(buf, manifest)
        return writer.index()

    def _place(self, index: CacheIndex) -> None:
        """Reads the data file into one segment, checks every expert's checksum and rebuilds damaged ones."""
        size = max(page_align(index.data_bytes), 1)
        segment = self._allocate(size)
        bar = tqdm(total=index.data_bytes, desc=f"loading shard {self.shard}", unit="B", unit_scale=True,
                   disable=not self.progress)
        for n in self._cache.read_into(index, memoryview(segment)):
            bar.update(n)
        bar.close()
        bad = [k for k, e in index.entries.items()
               if checksum(segment[e.offset:e.offset + e.manifest.nbytes]) != e.manifest.checksum]
        if bad:
            log.warning("shard %s: cache file %s is corrupt: %d experts fail their checksum (%s); re-quantizing them",
                        self.shard, self._cache.data_path, len(bad), ", ".join(map(str, bad[:8])))
            for buf, manifest in self._quantize(bad, f"repairing shard {self.shard}"):
                index = self._cache.patch(index, buf, manifest)
                off = index.entries[manifest.key].offset
                segment[off:off + manifest.nbytes] = buf
                self._stats["cache_repaired_experts"] += 1
            self._cache.write_index(index)
        self._entries = {k: (e.offset, e.manifest) for k, e in index.entries.items()}
        if self.storage == "ray":
            self._put_into_ray(segment)
        else:
            self._views = {k: segment[o:o + m.nbytes] for k, (o, m) in self._entries.items()}

    def _allocate(self, size: int) -> np.ndarray:
        """The segment the experts live in: POSIX shm, or a private buffer that is then ray.put per expert."""
        if self.storage == "ray":
            return np.empty(size, dtype=np.uint8)
        free = _shm_free_bytes()
        if free is not None and free < size:
            raise MemoryError(f"/dev/shm has {free / 1e9:.2f} GB free, shard {self.shard} needs {size / 1e9:.2f} GB; "
                              "enlarge it (e.g. docker --shm-size) or use more shards")
        prefix = f"moe-{self.fingerprint[:8]}-s{self.shard.index}of{self.shard.count}-"
        removed = unlink_orphan_segments(prefix, self._pid)
        if removed:
            log.warning("shard %s: removed %d shared-memory segment(s) of dead workers (%s*)", self.shard,
                        removed, prefix)
            self.count("orphan_segments_removed", removed)
        base = f"{prefix}{self._pid}"
        for attempt in range(100):  # a second store of the same shard in one process gets a suffix
            name = base if attempt == 0 else f"{base}-{attempt}"
            try:
                self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free shared-memory name for {base}")
        self._segment = np.frombuffer(self._shm.buf, dtype=np.uint8, count=size)
        return self._segment

    def _put_into_ray(self, segment: np.ndarray) -> None:
        import ray  # only Ray mode needs it

        for key, (off, m) in self._entries.items():
            ref = ray.put(segment[off:off + m.nbytes].copy())
            self._refs[key] = ref
            self._views[key] = ray.get(ref)  # read-only, zero-copy view into the object store

    # ---- serving -------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True once every expert is loaded and verified."""
        return self._ready.is_set()

    @property
    def bytes_held(self) -> int:
        return sum(m.nbytes for _, m in self._entries.values())

    def keys(self) -> list[ExpertKey]:
        """The experts of this shard (known before loading)."""
        return list(self._keys)

    def info(self) -> StoreInfo:
        """Identity, settings and contents; valid while loading (``ready`` False)."""
        return StoreInfo(worker_id=f"{socket.gethostname()}:{self._pid}:{self.shard}:{self.replica}",
                         host_id=self._host_id, pid=self._pid, model_fingerprint=self.fingerprint,
                         shard=self.shard, replica=self.replica, spec=self.spec, layout=self.layout,
                         experts=tuple(self._keys), ready=self.ready, bytes_held=self.bytes_held,
                         storage=self.storage)

    def _lookup(self, key: ExpertKey) -> tuple[int, ExpertManifest]:
        if not (0 <= key.layer < self.layout.num_layers and 0 <= key.expert < self.layout.num_experts):
            raise ExpertNotFound(f"expert {key} does not exist: the model has {self.layout.num_layers} layers "
                                 f"x {self.layout.num_experts} experts")
        if not self.shard.owns(key, self.layout.num_experts):
            raise ExpertNotFound(f"expert {key} is not in shard {self.shard} of this worker")
        if not self.ready:
            raise WorkerNotReady(f"shard {self.shard} is still loading")
        return self._entries[key]

    def manifest(self, key: ExpertKey) -> ExpertManifest:
        """The manifest of one expert. ExpertNotFound / WorkerNotReady."""
        return self._lookup(key)[1]

    def buffer(self, key: ExpertKey) -> np.ndarray:
        """Zero-copy uint8 view of one packed expert (read-only under Ray)."""
        self._lookup(key)
        return self._views[key]

    def handle(self, key: ExpertKey) -> ExpertHandle:
        """Where a co-located reader maps this expert from."""
        off, m = self._lookup(key)
        self.count("handles")
        if self.storage == "ray":
            return ExpertHandle(self._host_id, "", self._refs[key].hex(), 0, m.nbytes, m.nbytes, m)
        assert self._shm is not None
        return ExpertHandle(self._host_id, self._shm.name, "", off, m.nbytes, self._shm.size, m)

    def object_ref(self, key: ExpertKey) -> Any:
        """The Ray ObjectRef of one expert's numpy array (Ray storage only)."""
        self._lookup(key)
        if self.storage != "ray":
            raise ValueError("object refs exist only with storage='ray'")
        return self._refs[key]

    def chunks(self, key: ExpertKey, chunk_bytes: int) -> Iterator[tuple[int, memoryview]]:
        """``(offset, bytes)`` pieces of one expert for streaming; counts the fetch."""
        view = memoryview(self.buffer(key))
        self.count("fetches")
        for off in range(0, len(view), chunk_bytes):
            piece = view[off:off + chunk_bytes]
            self.count("bytes_sent", len(piece))
            yield off, piece

    def count(self, name: str, n: float = 1) -> None:
        """Adds to a counter (servers count errors here too)."""
        with self._stats_lock:
            self._stats[name] = self._stats.get(name, 0) + n

    def stats(self) -> dict[str, float]:
        """Counters: fetches, bytes_sent, handles, errors, load_seconds, quantized_experts, cache_reused,
        cache_repaired_experts, bytes_held, experts, ready."""
        with self._stats_lock:
            out = dict(self._stats)
        return out | {"bytes_held": self.bytes_held, "experts": len(self._keys), "ready": float(self.ready)}

    def close(self) -> None:
        """Unlinks the shared-memory segment (readers that mapped it keep their mapping) and drops Ray refs."""
        self._ready.clear()
        self._views.clear()
        self._refs.clear()
        self._segment = None
        if self._shm is not None:
            shm, self._shm = self._shm, None
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
            release_shm(shm)

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_shm", None) is not None:
            self.close()


def release_shm(shm: shared_memory.SharedMemory) -> None:
    """Closes our handle on a segment. If callers still hold views into it, the mapping is left to them (it is
    unmapped when the last view goes) instead of raising, now or later in SharedMemory.__del__."""
    try:
        shm.close()
    except BufferError:
        shm._mmap = None  # type: ignore[attr-defined]  # CPython detail: the views keep the mmap alive
        shm.close()


def unlink_orphan_segments(prefix: str, own_pid: int, root: Path = Path("/dev/shm")) -> int:
    """Unlinks the segments ``<prefix><pid>[-k]`` whose process no longer exists and returns how many: a worker
    killed with SIGKILL never unlinks its segment, so its memory would stay allocated until reboot. Readers that
    still map one keep their mapping (unlink only removes the name). Assumes the writers share our pid namespace."""
    removed = 0
    try:
        candidates = list(root.glob(f"{prefix}*"))
    except OSError:
        return 0
    for path in candidates:
        pid = path.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or int(pid) == own_pid or _alive(int(pid)):
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _default_cache_root() -> Path:
    from modelzoo import cache_dir

    return cache_dir() / "experts"


def _shm_free_bytes() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
