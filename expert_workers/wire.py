"""The edge between protobuf messages and core objects: the only module of expert_workers that imports the
generated ``experts_pb2`` code. Everything else deals in ExpertKey, StoreInfo, ExpertHandle and manifests."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import protos
from expert_workers.format import ExpertKey, ExpertManifest, QuantSpec
from expert_workers.store import ExpertHandle, StoreInfo

pb: ModuleType = protos.load("experts_pb2")
pb_grpc: ModuleType = protos.load("experts_pb2_grpc")

SERVICE_NAME = "moe.v1.ExpertService"
DEFAULT_CHUNK_BYTES = 2 * 2**20
MIN_CHUNK_BYTES = 64 * 2**10
MAX_CHUNK_BYTES = 4 * 2**20
MAX_MESSAGE_BYTES = 64 * 2**20
"""gRPC send/receive limit on both ends: a chunk (<= 4 MiB) plus the manifest fits with room to spare, and
anything far larger is a bug or an attack."""


def key_from_pb(msg: Any, what: str = "request") -> ExpertKey:
    """The ``key`` field of a request; ValueError (INVALID_ARGUMENT) when it is absent."""
    if not msg.HasField("key"):
        raise ValueError(f"{what} has no key: set key.layer and key.expert")
    return ExpertKey(int(msg.key.layer), int(msg.key.expert))


def key_to_pb(key: ExpertKey) -> Any:
    return pb.ExpertKey(layer=key.layer, expert=key.expert)


def chunk_size(requested: int) -> int:
    """The chunk size a fetch uses: 0 means the default; 1 B..64 MiB is clamped to [64 KiB, 4 MiB]; more is
    not a chunk size anyone means (ValueError -> INVALID_ARGUMENT)."""
    if requested == 0:
        return DEFAULT_CHUNK_BYTES
    if requested > MAX_MESSAGE_BYTES:
        raise ValueError(f"chunk_bytes {requested} is absurd: use 0 (default 2 MiB) or up to {MAX_MESSAGE_BYTES}; "
                         f"it is clamped to [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
    return min(max(requested, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)


def info_to_pb(info: StoreInfo) -> Any:
    return pb.WorkerInfo(
        worker_id=info.worker_id, host_id=info.host_id, pid=info.pid, model_fingerprint=info.model_fingerprint,
        shard_index=info.shard.index, num_shards=info.shard.count, replica=info.replica, bits=info.spec.bits,
        group_size=info.spec.group_size, num_layers=info.layout.num_layers, num_experts=info.layout.num_experts,
        experts=[key_to_pb(k) for k in info.experts], ready=info.ready, bytes_held=info.bytes_held,
        storage=info.storage, meta_bits=info.spec.meta_bits)


@dataclass(frozen=True)
class RemoteInfo:
    """What a remote worker reported about itself (WorkerInfo as a core object)."""

    worker_id: str
    """Unique per process start."""
    host_id: str
    """Equal to ours => co-located (its shm is mappable)."""
    pid: int
    """Worker process id."""
    model_fingerprint: str
    """Source checkpoint fingerprint."""
    shard_index: int
    """I of I/N."""
    num_shards: int
    """N of I/N."""
    replica: int
    """Which copy of the shard."""
    spec: QuantSpec
    """bits and group size."""
    num_layers: int
    """Layers of the model."""
    num_experts: int
    """Experts per layer."""
    experts: tuple[ExpertKey, ...]
    """What it holds."""
    ready: bool
    """False while loading."""
    bytes_held: int
    """Bytes of packed experts it holds."""
    storage: str
    """"shm" or "ray"."""


def info_from_pb(msg: Any) -> RemoteInfo:
    return RemoteInfo(
        worker_id=msg.worker_id, host_id=msg.host_id, pid=msg.pid, model_fingerprint=msg.model_fingerprint,
        shard_index=msg.shard_index, num_shards=msg.num_shards, replica=msg.replica,
        spec=QuantSpec(bits=msg.bits, group_size=msg.group_size if msg.bits != 16 else 64,
                       meta_bits=msg.meta_bits or 16),
        num_layers=msg.num_layers, num_experts=msg.num_experts,
        experts=tuple(ExpertKey(k.layer, k.expert) for k in msg.experts), ready=msg.ready,
        bytes_held=msg.bytes_held, storage=msg.storage)


def handle_to_pb(h: ExpertHandle) -> Any:
    return pb.ExpertHandle(host_id=h.host_id, shm_name=h.shm_name, ray_object_id=h.ray_object_id, offset=h.offset,
                           length=h.length, manifest=h.manifest.to_msgpack(), segment_bytes=h.segment_bytes)


def handle_from_pb(msg: Any) -> ExpertHandle:
    return ExpertHandle(host_id=msg.host_id, shm_name=msg.shm_name, ray_object_id=msg.ray_object_id,
                        offset=msg.offset, length=msg.length, segment_bytes=msg.segment_bytes,
                        manifest=ExpertManifest.from_msgpack(msg.manifest))


def chunk_to_pb(offset: int, data: memoryview, manifest: ExpertManifest | None) -> Any:
    """One streamed piece; the first (``manifest`` given) also carries the manifest and total size."""
    if manifest is None:
        return pb.ExpertChunk(offset=offset, data=bytes(data))
    return pb.ExpertChunk(offset=offset, data=bytes(data), manifest=manifest.to_msgpack(),
                          total_bytes=manifest.nbytes)


def fetch_request(key: ExpertKey, chunk_bytes: int = 0) -> Any:
    return pb.FetchExpertRequest(key=key_to_pb(key), chunk_bytes=chunk_bytes)


def handle_request(key: ExpertKey) -> Any:
    return pb.GetHandleRequest(key=key_to_pb(key))


def info_request() -> Any:
    return pb.GetInfoRequest()


def stats_request() -> Any:
    return pb.GetStatsRequest()


def stats_to_pb(values: dict[str, float]) -> Any:
    return pb.WorkerStats(values={k: float(v) for k, v in values.items()})


def stats_from_pb(msg: Any) -> dict[str, float]:
    return dict(msg.values)
