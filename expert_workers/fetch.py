"""``RemoteSource``: the ExpertSource over expert worker processes (gRPC, plus shared memory when co-located).

    source = RemoteSource(["127.0.0.1:50061", "127.0.0.1:50062"], timeout_s=10)
    manifest = source.fetch_into(key, pinned_uint8_buffer)   # a copy, checksum verified
    view = source.host_view(key)                             # zero-copy view of a co-located worker's shm, or None

Paths, fastest first:

- **zero-copy**: the worker runs on this host (same ``host_id``) and keeps its experts in POSIX shm. We map its
  segment once (whole), unregistered from the resource tracker so our exit never unlinks the worker's memory,
  and hand out views into it (``host_view``) or copy from it (``fetch_into``). Nothing crosses a socket.
- **Ray object store**: a worker with ``storage == "ray"`` whose Ray actor handle was given (``actors=``): its
  ObjectRefs are resolved with ``ray.get``, zero-copy on the same node.
- **gRPC streaming**: ``FetchExpert`` chunks written straight into the caller's buffer, under a deadline.

Every byte handed out is checked against the manifest's xxh3 checksum; a mismatch or a truncated stream counts as
DATA_LOSS (``checksum_failures``) and the next replica is tried; the bad bytes only ever sit in the caller's
buffer, which the retry overwrites. Replicas are tried co-located first, then round-robin; a slow or corrupt one
is tried last for ``cooldown_s`` (doubling with each further failure in a row, up to ``MAX_COOLDOWN_FACTOR``
times: a replica that keeps timing out stops stalling requests); one that is gone (UNAVAILABLE, lost objects) is
tried last until a ``replicas.Reviver`` thread sees it ready again (at its new address, for a restarted Ray
actor).
``ExpertUnavailable`` when none works; every RPC has a deadline (``timeout_s`` for fetches and handles).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

from expert_workers import wire
from expert_workers.format import ExpertKey, ExpertLayout, ExpertManifest, checksum
from expert_workers.replicas import (DataLoss, Dialer, Replica, ReplicaGone, Reviver, map_segment,
                                     release_segments, same_shard)
from expert_workers.source import ExpertNotFound, ExpertUnavailable
from expert_workers.store import ExpertHandle, host_id

__all__ = ["DataLoss", "RemoteSource"]

log = logging.getLogger(__name__)
R = TypeVar("R")

FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS,
                  grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
"""Codes that are the replica's problem, not the request's: try another replica. (NOT_FOUND: a worker restarted
with another shard.) INVALID_ARGUMENT and auth errors are ours and would fail everywhere: they are raised."""
MAX_COOLDOWN_FACTOR = 32
"""A replica failing again and again sits out at most this many times ``cooldown_s`` between attempts."""


class RemoteSource:
    """ExpertSource over expert worker processes. Thread-safe: fetches may run on many threads at once."""

    def __init__(self, addresses: Sequence[str], *, timeout_s: float = 30.0, connect_timeout_s: float = 30.0,
                 prefer_zero_copy: bool = True, chunk_bytes: int = 0, cooldown_s: float = 2.0,
                 credentials: grpc.ChannelCredentials | None = None, metadata: Sequence[tuple[str, str]] = (),
                 actors: Mapping[str, Any] | None = None, probe_s: float = 0.25) -> None:
        """``addresses``: HOST:PORT of every worker (all shards, all replicas). ``timeout_s``: deadline of one
        fetch attempt (and of every other RPC). ``connect_timeout_s``: how long startup waits for a worker to
        answer GetInfo. ``prefer_zero_copy``: False forces gRPC streaming even for co-located workers.
        ``chunk_bytes``: stream chunk size (0 = server default). ``cooldown_s``: how long a slow or corrupt
        replica is tried only last after its first failure in a row (doubling with each further one).
        ``credentials`` (TLS) and ``metadata`` (e.g. an auth token) go on every call. ``actors``: address -> Ray
        actor handle, for zero-copy reads of Ray-storage workers and for finding a restarted actor's new address.
        ``probe_s``: first interval at which a gone replica is polled."""
        if not addresses:
            raise ValueError("RemoteSource needs at least one worker address")
        self.timeout_s, self.prefer_zero_copy, self.chunk_bytes = timeout_s, prefer_zero_copy, chunk_bytes
        self.cooldown_s = cooldown_s
        self._dialer = Dialer(credentials, tuple(metadata))
        self._metadata = self._dialer.metadata
        self._host_id = host_id()
        self._lock = threading.Lock()
        self._stats: dict[str, float] = {k: 0.0 for k in (
            "fetches", "bytes_fetched", "grpc_fetches", "remote_fetches", "shm_copies", "zero_copy_reads",
            "zero_copy_verified_ahead",
            "ray_reads", "checksum_failures", "failovers", "rpc_errors", "deadline_exceeded", "replicas_gone",
            "revivals", "unavailable")}
        self._manifests: dict[ExpertKey, ExpertManifest] = {}
        self._verified: set[tuple[str, ExpertKey]] = set()
        self._rr: dict[tuple[int, ...], itertools.count[int]] = {}
        self._reviver = Reviver(self._dialer, self._revived, probe_s=probe_s,
                                probe_timeout_s=min(2.0, timeout_s, connect_timeout_s))
        self._workers: list[Replica] = []
        try:
            for a in dict.fromkeys(addresses):
                self._workers.append(self._connect(a, (actors or {}).get(a), connect_timeout_s))
            self._replicas = self._replica_map()
        except BaseException:
            self.close()
            raise
        self._layout: ExpertLayout | None = None

    # ---- setup ---------------------------------------------------------------------------------------------
    def _connect(self, address: str, actor: Any, timeout_s: float) -> Replica:
        try:
            # wait_for_ready: a worker that is still starting (not yet bound) gets until the deadline
            channel, stub, info = self._dialer.dial(address, timeout_s, wait_for_ready=True)
        except grpc.RpcError as e:
            raise ExpertUnavailable(f"expert worker {address} did not answer GetInfo within {timeout_s}s: "
                                    f"{e.code().name}: {e.details()}") from e
        return Replica(address, channel, stub, info, info.host_id == self._host_id, actor=actor)

    def _replica_map(self) -> dict[ExpertKey, list[Replica]]:
        """key -> workers holding it; checks that the workers agree on the model and cover all of it."""
        first = self._workers[0].info
        for w in self._workers[1:]:
            i = w.info
            if (i.model_fingerprint, i.spec, i.num_layers, i.num_experts) != \
                    (first.model_fingerprint, first.spec, first.num_layers, first.num_experts):
                raise ValueError(
                    f"expert workers disagree: {self._workers[0].address} serves model {first.model_fingerprint[:8]} "
                    f"at {first.spec.label} ({first.num_layers}x{first.num_experts}), "
                    f"{w.address} serves {i.model_fingerprint[:8]} at {i.spec.label} "
                    f"({i.num_layers}x{i.num_experts})")
        replicas: dict[ExpertKey, list[Replica]] = {}
        for w in self._workers:
            for k in w.info.experts:
                replicas.setdefault(k, []).append(w)
        all_keys = [ExpertKey(layer, e) for layer in range(first.num_layers) for e in range(first.num_experts)]
        missing = [k for k in all_keys if k not in replicas]
        if missing:
            raise ValueError(f"the {len(self._workers)} expert workers do not cover {len(missing)} of "
                             f"{len(all_keys)} experts (e.g. {', '.join(map(str, missing[:4]))}); "
                             "start the missing shards")
        return replicas

    # ---- ExpertSource --------------------------------------------------------------------------------------
    def layout(self) -> ExpertLayout:
        """Layers and experts from GetInfo; hidden and intermediate size from an expert's w1 [I, H]."""
        if self._layout is None:
            info = self._workers[0].info
            w1 = self.manifest(ExpertKey(0, 0)).matrices["w1"].shape
            self._layout = ExpertLayout(num_layers=info.num_layers, num_experts=info.num_experts,
                                        hidden_size=w1[1], intermediate_size=w1[0])
        return self._layout

    def workers(self) -> list[wire.RemoteInfo]:
        """What every worker reported at connect time."""
        return [w.info for w in self._workers]

    def manifest(self, key: ExpertKey) -> ExpertManifest:
        """The expert's manifest (GetExpertHandle on a live replica once; cached)."""
        with self._lock:
            if key in self._manifests:
                return self._manifests[key]
        errors: list[str] = []
        for w in self._order(key):
            try:
                handle = self._handle(w, key)
            except grpc.RpcError as e:
                self._on_rpc_error(w, e, errors)
                continue
            with self._lock:
                self._manifests[key] = handle.manifest
            return handle.manifest
        self._count("unavailable")
        raise ExpertUnavailable(f"no replica answered for expert {key}: {'; '.join(errors)}")

    def fetch_into(self, key: ExpertKey, out: torch.Tensor, timeout_s: float | None = None) -> ExpertManifest:
        """Copies the expert into ``out[:nbytes]`` (CPU uint8, usually pinned) and verifies the checksum of what
        landed there; tries the next replica on UNAVAILABLE, DEADLINE_EXCEEDED, DATA_LOSS."""
        if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous CPU uint8 tensor, got {out.dtype} on {out.device}")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        errors: list[str] = []
        for attempt, w in enumerate(self._order(key)):
            if attempt:
                self._count("failovers")
            manifest = self._attempt(w, key, errors, functools.partial(self._fetch_from, w, key, out, timeout))
            if manifest is not None:
                self._count("fetches")
                self._count("bytes_fetched", manifest.nbytes)
                return manifest
        self._count("unavailable")
        raise ExpertUnavailable(f"no replica could serve expert {key}: {'; '.join(errors)}")

    def host_view(self, key: ExpertKey) -> torch.Tensor | None:
        """Zero-copy CPU uint8 view of the expert in a co-located worker's memory (checksum verified the first
        time), or None when no co-located replica is reachable (then use ``fetch_into``)."""
        if not self.prefer_zero_copy:
            return None
        errors: list[str] = []
        for w in self._order(key):
            if not self._zero_copy_capable(w):
                continue
            view = self._attempt(w, key, errors, functools.partial(self._checked_view, w, key))
            if view is not None:
                self._count("zero_copy_reads")
                return view
        return None

    def stats(self) -> dict[str, float]:
        """Counters: fetches, bytes_fetched, grpc_fetches (= remote_fetches), shm_copies, zero_copy_reads,
        ray_reads, checksum_failures (corrupt or truncated payloads), failovers, rpc_errors, deadline_exceeded,
        replicas_gone, revivals, unavailable (requests no replica could serve)."""
        with self._lock:
            return dict(self._stats)

    def replicas(self) -> list[dict[str, Any]]:
        """Every replica's state: address, worker_id, pid, shard, replica, healthy, gone, served, failures,
        revivals."""
        now = time.monotonic()
        with self._lock:
            return [w.status(now) for w in self._workers]

    def worker_stats(self) -> dict[str, dict[str, float]]:
        """Each worker's own counters (GetStats), by address; unreachable workers are left out."""
        out = {}
        for w in self._workers:
            try:
                out[w.address] = wire.stats_from_pb(w.stub.GetStats(wire.stats_request(), timeout=self.timeout_s,
                                                                     metadata=self._metadata))
            except grpc.RpcError:
                continue
        return out

    def close(self) -> None:
        """Stops the revival threads, closes channels and unmaps shared memory (views handed out keep their
        mapping alive)."""
        self._reviver.close()
        for w in self._workers:
            release_segments(w.forget_process())
            w.channel.close()

    def __enter__(self) -> RemoteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- replica choice ------------------------------------------------------------------------------------
    def _order(self, key: ExpertKey) -> list[Replica]:
        """Replicas to try: healthy co-located ones (zero-copy), healthy remote ones from a rotating start
        (spreads load), then the ones in cooldown or gone (better late than UNAVAILABLE)."""
        try:
            replicas = self._replicas[key]
        except KeyError:
            raise ExpertNotFound(f"no expert worker holds expert {key}") from None
        now = time.monotonic()
        group = tuple(id(w) for w in replicas)  # one counter per replica set: keys of one shard rotate
        with self._lock:
            counter = self._rr.setdefault(group, itertools.count())
        start = next(counter) % len(replicas)
        rotated = replicas[start:] + replicas[:start]
        healthy = [w for w in rotated if w.down_until <= now]
        local = [w for w in healthy if self._zero_copy_capable(w)]
        return local + [w for w in healthy if w not in local] + [w for w in rotated if w.down_until > now]

    def _mark_down(self, w: Replica, gone: bool = False) -> None:
        """Out of rotation: for a cooldown, or (``gone``) until the Reviver sees it ready again."""
        with self._lock:
            w.failures += 1
            w.strikes += 1
            cooldown = self.cooldown_s * min(2 ** (w.strikes - 1), MAX_COOLDOWN_FACTOR)
            w.down_until = math.inf if gone else max(w.down_until, time.monotonic() + cooldown)
            w.handles.clear()  # a restarted worker has a new segment: ask again
        if gone:
            self._count("replicas_gone")
            self._reviver.watch(w)

    def _on_rpc_error(self, w: Replica, e: grpc.RpcError, errors: list[str]) -> None:
        code = e.code()
        self._count("rpc_errors")
        if code not in FAILOVER_CODES:
            raise e  # INVALID_ARGUMENT, auth, ...: every replica would say the same
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self._count("deadline_exceeded")
        self._mark_down(w, gone=code == grpc.StatusCode.UNAVAILABLE)
        errors.append(f"{w.address}: {code.name}: {e.details()}")
        log.info("expert worker %s: %s (%s); trying another replica", w.address, code.name, e.details())

    def _on_bad_replica(self, w: Replica, key: ExpertKey, e: Exception, errors: list[str]) -> None:
        lost = isinstance(e, DataLoss)
        if lost:
            self._count("checksum_failures")
        self._mark_down(w, gone=not lost)
        errors.append(f"{w.address}: {'DATA_LOSS' if lost else 'UNAVAILABLE'}: {e}")
        log.warning("expert %s from %s: %s; trying another replica", key, w.address, e)

    def _attempt(self, w: Replica, key: ExpertKey, errors: list[str], call: Callable[[], R | None]) -> R | None:
        """``call()`` on replica ``w``. A failure that is the replica's (see ``FAILOVER_CODES``, DataLoss, a gone
        replica) puts it in cooldown or marks it gone, adds a line to ``errors`` and gives None: try the next
        one. A result resets the replica's strikes; None from ``call`` (nothing to read there) changes nothing.
        Errors every replica would give (INVALID_ARGUMENT, auth) propagate."""
        try:
            result = call()
        except grpc.RpcError as e:
            self._on_rpc_error(w, e, errors)
            return None
        except (DataLoss, ReplicaGone) as e:
            self._on_bad_replica(w, key, e, errors)
            return None
        if result is not None:
            w.served, w.strikes = w.served + 1, 0
        return result

    def _revived(self, w: Replica, address: str, channel: grpc.Channel | None, stub: Any,
                 info: wire.RemoteInfo) -> bool:
        """Reviver callback: swaps in a ready replica's (new) channel and identity; False if it now serves
        something else (it stays out of rotation, tried only when nothing else is left)."""
        if not same_shard(w.info, info):
            log.error("expert worker at %s came back serving another shard or model (%s, shard %d/%d); "
                      "leaving it out", address, info.model_fingerprint[:8], info.shard_index, info.num_shards)
            return False
        old_channel, segments = None, []
        with self._lock:
            if channel is not None:
                old_channel, w.address, w.channel, w.stub = w.channel, address, channel, stub
            if info.worker_id != w.info.worker_id:  # a new process: new segments and objects
                segments = w.forget_process()
                self._verified = {v for v in self._verified if v[0] != w.info.worker_id}
            w.info, w.colocated = info, info.host_id == self._host_id
            w.down_until, w.strikes = 0.0, 0
            w.revivals += 1
        release_segments(segments)
        if old_channel is not None:
            old_channel.close()
        self._count("revivals")
        log.info("expert worker shard %d/%d replica %d is back at %s (pid %d)", info.shard_index, info.num_shards,
                 info.replica, address, info.pid)
        return True

    def _count(self, name: str, n: float = 1) -> None:
        with self._lock:
            self._stats[name] += n

    # ---- transports ----------------------------------------------------------------------------------------
    def _zero_copy_capable(self, w: Replica) -> bool:
        if not (self.prefer_zero_copy and w.colocated):
            return False
        if w.shm_broken:
            return False
        return w.actor is not None if w.info.storage == "ray" else w.info.storage == "shm"

    def _fetch_from(self, w: Replica, key: ExpertKey, out: torch.Tensor, timeout: float) -> ExpertManifest:
        if self._zero_copy_capable(w):
            view_or_none = self._try_local_view(w, key)
            if view_or_none is not None:
                view, manifest = view_or_none
                self._check_room(key, manifest, out)
                out[:manifest.nbytes].copy_(view)
                self._count("shm_copies")
                return self._verified_copy(out, manifest)
        return self._stream(w, key, out, timeout)

    def _try_local_view(self, w: Replica, key: ExpertKey) -> tuple[torch.Tensor, ExpertManifest] | None:
        """``_local_view``, or None (and gRPC from then on) when this worker's memory is not reachable here."""
        try:
            return self._local_view(w, key)
        except (grpc.RpcError, DataLoss, ReplicaGone):
            raise
        except Exception as e:  # noqa: BLE001 - e.g. same host id but another /dev/shm (containers)
            log.warning("cannot read the memory of %s directly (%s: %s); using gRPC", w.address,
                        type(e).__name__, e)
            w.shm_broken = True
            return None

    def verify_local(self, keys: Sequence[ExpertKey]) -> list[torch.Tensor]:
        """Maps, checksums and returns the zero-copy view of every one of ``keys`` a co-located replica holds,
        ahead of use. The first view of an expert otherwise costs ~9 ms for a 55 MB Mixtral expert (page faults
        plus the checksum) plus a GetExpertHandle call, inside a decode step. Problems are handled as in
        ``host_view`` (that replica is skipped, and the expert is read another way when needed)."""
        views: list[torch.Tensor] = []
        if not self.prefer_zero_copy:
            return views
        for key in keys:
            errors: list[str] = []
            for w in self._order(key):
                if self._zero_copy_capable(w):
                    view = self._attempt(w, key, errors, functools.partial(self._checked_view, w, key))
                    if view is not None:
                        views.append(view)
                        break
        self._count("zero_copy_verified_ahead", len(views))
        return views

    def _checked_view(self, w: Replica, key: ExpertKey) -> torch.Tensor | None:
        """``_try_local_view``, its checksum verified the first time this worker process hands it out."""
        local = self._try_local_view(w, key)
        if local is None:
            return None
        view, manifest = local
        if (w.info.worker_id, key) not in self._verified:
            if checksum(view) != manifest.checksum:
                raise DataLoss(f"expert {key} in the shared memory of {w.address} fails its checksum")
            with self._lock:
                self._verified.add((w.info.worker_id, key))
        return view

    def _handle(self, w: Replica, key: ExpertKey) -> ExpertHandle:
        h = w.handles.get(key)
        if h is None:
            msg = w.stub.GetExpertHandle(wire.handle_request(key), timeout=self.timeout_s, metadata=self._metadata)
            h = w.handles[key] = wire.handle_from_pb(msg)
        return h

    def _local_view(self, w: Replica, key: ExpertKey) -> tuple[torch.Tensor, ExpertManifest]:
        """A view of the expert in the co-located worker's shm segment or Ray object (mapped once)."""
        if w.info.storage == "ray":
            return self._ray_view(w, key)
        h = self._handle(w, key)
        with self._lock:
            seg = w.segments.get(h.shm_name)
            if seg is None:
                seg = w.segments[h.shm_name] = map_segment(h.shm_name, h.segment_bytes)
        if h.offset + h.length > seg.tensor.numel() or h.length != h.manifest.nbytes:
            raise DataLoss(f"handle of {key} from {w.address} points outside its segment")
        return seg.tensor[h.offset:h.offset + h.length], h.manifest

    def _ray_view(self, w: Replica, key: ExpertKey) -> tuple[torch.Tensor, ExpertManifest]:
        import ray  # only with Ray-storage workers

        try:
            if w.refs is None:
                w.refs = ray.get(w.actor.object_refs.remote(), timeout=self.timeout_s)
            array = ray.get(w.refs[key], timeout=self.timeout_s)
        except ray.exceptions.RayError as e:  # the actor (owner of the objects) died or is restarting
            raise ReplicaGone(f"Ray objects of {w.address} unreachable: {type(e).__name__}: {e}") from e
        self._count("ray_reads")
        with warnings.catch_warnings():  # object-store arrays are read-only; the view is only ever read
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array), self._handle(w, key).manifest

    def _stream(self, w: Replica, key: ExpertKey, out: torch.Tensor, timeout: float) -> ExpertManifest:
        """FetchExpert into ``out``: chunks land at their offsets; the whole must be exactly the manifest's."""
        call = w.stub.FetchExpert(wire.fetch_request(key, self.chunk_bytes), timeout=timeout, metadata=self._metadata)
        dst = out.numpy()
        manifest: ExpertManifest | None = None
        received = 0
        try:
            for chunk in call:
                if manifest is None:
                    manifest = self._first_chunk(key, chunk, out)
                end = chunk.offset + len(chunk.data)
                if end > manifest.nbytes:
                    raise DataLoss(f"chunk [{chunk.offset}, {end}) of {key} lies past its {manifest.nbytes} bytes")
                dst[chunk.offset:end] = np.frombuffer(chunk.data, dtype=np.uint8)
                received += len(chunk.data)
        except BaseException:
            call.cancel()
            raise
        if manifest is None or received != manifest.nbytes:
            raise DataLoss(f"stream of {key} from {w.address} ended after {received} bytes"
                           + (f" of {manifest.nbytes}" if manifest else " without a manifest"))
        self._count("grpc_fetches")
        self._count("remote_fetches")
        return self._verified_copy(out, manifest)

    def _first_chunk(self, key: ExpertKey, chunk: Any, out: torch.Tensor) -> ExpertManifest:
        try:
            manifest = ExpertManifest.from_msgpack(chunk.manifest)
        except ValueError as e:
            raise DataLoss(f"first chunk of {key}: {e}") from e
        if manifest.key != key or manifest.nbytes != chunk.total_bytes:
            raise DataLoss(f"asked for {key}, got a manifest for {manifest.key} of {manifest.nbytes} bytes "
                           f"(total_bytes {chunk.total_bytes})")
        self._check_room(key, manifest, out)
        return manifest

    @staticmethod
    def _check_room(key: ExpertKey, manifest: ExpertManifest, out: torch.Tensor) -> None:
        if out.numel() < manifest.nbytes:
            raise ValueError(f"out has {out.numel()} bytes, expert {key} needs {manifest.nbytes}")

    @staticmethod
    def _verified_copy(out: torch.Tensor, manifest: ExpertManifest) -> ExpertManifest:
        if checksum(out[:manifest.nbytes]) != manifest.checksum:
            raise DataLoss(f"expert {manifest.key} fails its xxh3 checksum")
        return manifest
