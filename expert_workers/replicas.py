"""One expert worker as ``RemoteSource`` sees it (``Replica``), how to dial it (``Dialer``), and the ``Reviver``
that puts replicas back into rotation after they went away.

A replica that answered UNAVAILABLE (its process died, it is restarting, it is still loading) or whose Ray
objects vanished is *gone*: it leaves the rotation (it is still tried, last, when nothing else is left) and one
daemon thread watches it. The thread asks Ray for the actor's current address when the replica is a Ray actor
(a restarted actor usually listens on a new port), polls GetInfo until the worker says it is ready, checks that
it still serves the same shard of the same model, and hands the new channel and identity to RemoteSource (a new
process has new shm segments and Ray objects). Slow (DEADLINE_EXCEEDED) or corrupt (DATA_LOSS) replicas are not
gone: they sit out a cooldown and are tried again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import grpc
import torch

from expert_workers import wire
from expert_workers.format import ExpertKey
from expert_workers.store import ExpertHandle, release_shm

log = logging.getLogger(__name__)

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
    # A worker restarted on its old port is reachable again within ~2 s, however long it was down (gRPC's
    # default backoff grows to 120 s between connection attempts).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class DataLoss(RuntimeError):
    """A payload failed its checksum, was truncated or did not match its manifest."""


class ReplicaGone(RuntimeError):
    """The replica's memory or Ray objects are unreachable because its process went away."""


@dataclass
class Segment:
    """One mapped shm segment of a co-located worker."""

    shm: shared_memory.SharedMemory
    """The mapping (unregistered from this process's resource tracker)."""
    tensor: torch.Tensor
    """uint8 view of the whole segment."""


@dataclass(eq=False)
class Replica:
    """One worker address: its channel, what it told us, its mapped memory and how it has fared."""

    address: str
    """HOST:PORT it listens on now (a restarted Ray actor may move)."""
    channel: grpc.Channel
    """gRPC channel to ``address``."""
    stub: Any
    """ExpertServiceStub on ``channel``."""
    info: wire.RemoteInfo
    """What the worker process reported (a new process: a new ``worker_id``)."""
    colocated: bool
    """Same host as us: its shm can be mapped."""
    actor: Any = None
    """Its Ray actor handle, when known: Ray-storage reads and address lookups after a restart."""
    down_until: float = 0.0
    """monotonic time before which it is tried only last (inf while gone and watched)."""
    watching: bool = False
    """A Reviver thread is watching it."""
    handles: dict[ExpertKey, ExpertHandle] = field(default_factory=dict)
    """Zero-copy handles it gave us (cleared when it fails)."""
    segments: dict[str, Segment] = field(default_factory=dict)
    """Its shm segments mapped here, by name."""
    refs: dict[ExpertKey, Any] | None = None
    """Its Ray ObjectRefs (Ray storage), fetched once per process."""
    shm_broken: bool = False
    """Its memory cannot be mapped here after all (e.g. another /dev/shm): gRPC only."""
    served: int = 0
    """Experts it delivered (fetches and zero-copy views)."""
    failures: int = 0
    """Attempts that failed (RPC errors, data loss, lost objects)."""
    strikes: int = 0
    """Failures since its last success (sets the cooldown)."""
    revivals: int = 0
    """Times it came back after being gone."""

    def status(self, now: float) -> dict[str, Any]:
        """What ``RemoteSource.replicas()`` reports for it."""
        i = self.info
        return {"address": self.address, "worker_id": i.worker_id, "pid": i.pid,
                "shard": f"{i.shard_index}/{i.num_shards}", "replica": i.replica, "healthy": self.down_until <= now,
                "gone": self.watching, "served": self.served, "failures": self.failures, "revivals": self.revivals}

    def forget_process(self) -> list[Segment]:
        """Drops what belonged to the previous process (handles, Ray refs, mappings); returns the segments for
        the caller to release."""
        segments = list(self.segments.values())
        self.handles.clear()
        self.segments.clear()
        self.refs = None
        self.shm_broken = False
        return segments


def same_shard(a: wire.RemoteInfo, b: wire.RemoteInfo) -> bool:
    """True when two GetInfo answers describe the same shard of the same model at the same settings."""
    return (a.model_fingerprint, a.spec, a.num_layers, a.num_experts, a.experts) == \
        (b.model_fingerprint, b.spec, b.num_layers, b.num_experts, b.experts)


@dataclass(frozen=True)
class Dialer:
    """Opens channels to expert workers with our credentials and call metadata."""

    credentials: grpc.ChannelCredentials | None = None
    """TLS channel credentials, or None for plaintext."""
    metadata: tuple[tuple[str, str], ...] = ()
    """Sent with every call (e.g. the auth token)."""

    def channel(self, address: str) -> tuple[grpc.Channel, Any]:
        options = list(CHANNEL_OPTIONS)
        channel = (grpc.secure_channel(address, self.credentials, options) if self.credentials is not None
                   else grpc.insecure_channel(address, options))
        return channel, wire.pb_grpc.ExpertServiceStub(channel)

    def info(self, stub: Any, timeout_s: float, wait_for_ready: bool = False) -> wire.RemoteInfo:
        """GetInfo under a deadline (raises grpc.RpcError)."""
        msg = stub.GetInfo(wire.info_request(), timeout=timeout_s, wait_for_ready=wait_for_ready,
                           metadata=self.metadata)
        return wire.info_from_pb(msg)

    def dial(self, address: str, timeout_s: float, wait_for_ready: bool) -> tuple[grpc.Channel, Any, wire.RemoteInfo]:
        """A channel, its stub and the worker's GetInfo; closes the channel when GetInfo fails."""
        channel, stub = self.channel(address)
        try:
            return channel, stub, self.info(stub, timeout_s, wait_for_ready)
        except BaseException:
            channel.close()
            raise


Revived = Callable[[Replica, str, "grpc.Channel | None", Any, wire.RemoteInfo], bool]
"""``(replica, address, new channel or None, new stub or None, info) -> accepted``."""


class Reviver:
    """One daemon thread per gone replica, polling it until it is back (see the module docstring)."""

    def __init__(self, dialer: Dialer, on_back: Revived, probe_s: float = 0.25, probe_timeout_s: float = 2.0,
                 max_probe_s: float = 2.0) -> None:
        """``on_back`` swaps a ready replica back in (RemoteSource). Probes start every ``probe_s`` and back off
        to ``max_probe_s``; each has a ``probe_timeout_s`` deadline."""
        self._dialer, self._on_back = dialer, on_back
        self.probe_s, self.probe_timeout_s, self.max_probe_s = probe_s, probe_timeout_s, max_probe_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()

    def watch(self, replica: Replica) -> None:
        """Starts watching ``replica`` unless it is watched already."""
        with self._lock:
            if replica.watching or self._stop.is_set():
                return
            replica.watching = True
            thread = threading.Thread(target=self._run, args=(replica,), daemon=True,
                                      name=f"expert-revive-{replica.address}")
            self._threads.add(thread)
        thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops every watcher (they finish their current probe) and waits for them."""
        self._stop.set()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout_s)

    def _run(self, replica: Replica) -> None:
        candidate: tuple[str, grpc.Channel, Any] | None = None  # a new address's channel, kept across probes
        pending: Any = None  # the outstanding actor.address() call
        interval = self.probe_s
        try:
            while not self._stop.wait(interval):
                interval = min(interval * 1.5, self.max_probe_s)
                address = replica.address
                if replica.actor is not None:
                    address, pending = self._actor_address(replica.actor, pending)
                    if address is None:
                        continue
                if address != replica.address and (candidate is None or candidate[0] != address):
                    if candidate is not None:
                        candidate[1].close()
                    candidate = (address, *self._dialer.channel(address))
                stub = candidate[2] if candidate is not None and address != replica.address else replica.stub
                try:
                    info = self._dialer.info(stub, self.probe_timeout_s)
                except grpc.RpcError:
                    continue
                if not info.ready:
                    continue
                fresh = candidate if candidate is not None and address != replica.address else None
                if self._on_back(replica, address, fresh[1] if fresh else None, stub if fresh else None, info):
                    if fresh is not None:
                        candidate = None  # RemoteSource owns the channel now
                return  # back, or refused for serving something else (then it stays out of rotation)
        finally:
            if candidate is not None:
                candidate[1].close()
            with self._lock:
                replica.watching = False
                self._threads.discard(threading.current_thread())

    def _actor_address(self, actor: Any, pending: Any) -> tuple[str | None, Any]:
        """The actor's current gRPC address, or None while it is restarting (the call stays pending)."""
        import ray  # only Ray-deployed replicas have actors

        if pending is None:
            pending = actor.address.remote()
        ready, _ = ray.wait([pending], timeout=self.probe_timeout_s)
        if not ready:
            return None, pending
        try:
            return str(ray.get(pending)), None
        except ray.exceptions.RayError as e:  # died again, or for good: ask again next probe
            log.debug("expert worker actor not reachable yet: %s", e)
            return None, None


def map_segment(name: str, size: int) -> Segment:
    """Maps a worker's segment without letting this process's resource tracker unlink it at our exit."""
    shm = shared_memory.SharedMemory(name=name)
    # Python <= 3.12 registers every attached segment and unlinks it when this process exits: the worker's
    # memory would vanish under it. 3.13 has track=False; unregistering is the portable equivalent.
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    if shm.size < size:
        release_shm(shm)
        raise DataLoss(f"shm segment {name} has {shm.size} bytes, the worker announced {size}")
    return Segment(shm, torch.frombuffer(shm.buf, dtype=torch.uint8, count=size))


def release_segments(segments: list[Segment]) -> None:
    """Unmaps segments of a process that is gone (views handed out keep their mapping alive)."""
    for seg in segments:
        release_shm(seg.shm)
