"""What a deployment is: its settings (``DeploySpec``) and the names of its Ray actors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NAMESPACE = "moe-serving"
"""Ray namespace of a deployment's named actors (``--namespace`` picks another, for several deployments)."""
COORDINATOR_ACTOR = "moe-coordinator"
"""Name of the actor that runs and supervises the coordinator process."""
WORKER_PREFIX = "expert-worker"
"""Prefix of expert worker actor names (the one ``coordinator --ray`` discovery looks for)."""
EXPERT_BITS = (2, 3, 4, 8, 16)
ATTN_BITS = (4, 8, 16)


class DeployError(RuntimeError):
    """The deployment is missing, already there, or failed to start."""


@dataclass(frozen=True)
class DeploySpec:
    """Everything ``deploy up`` was asked for; ``scale`` changes ``workers`` (and optionally ``replicas``)."""

    model: str
    """Checkpoint directory (as seen from every node) or an embedded model name (``smollm2-moe``)."""
    workers: int = 2
    """Shards N: the experts ``(layer * E + expert)`` are split by ``idx % N``."""
    replicas: int = 1
    """Copies R of every shard (N x R worker actors); the coordinator fails over between them."""
    port: int = 50051
    """Coordinator gRPC port (0: a free one, then kept across ``scale``)."""
    host: str = "127.0.0.1"
    """Interface the coordinator binds (anything but loopback needs an auth token)."""
    expert_bits: int = 2
    """hqq bits of the experts; 16 = unquantized (exact mode with ``attn_bits`` 16)."""
    group_size: int = 64
    """hqq group size of the experts."""
    attn_bits: int = 4
    """hqq bits of the coordinator's attention projections; 16 = as in the checkpoint."""
    device: str | None = None
    """Coordinator device ("cuda" / "cpu"); None: cuda when the coordinator's node has a GPU."""
    experts_per_layer: int | None = None
    """Coordinator cache slots per layer (k); None: derived from ``gpu_memory_gb`` / the coordinator default."""
    gpu_memory_gb: float | None = None
    """Coordinator device memory budget (sets the cache size)."""
    prefetch: int = 2
    """Next-layer experts the coordinator prefetches (0 = off)."""
    namespace: str = NAMESPACE
    """Ray namespace of the deployment's actors."""
    expert_host: float = 1.0
    """Units of the ``expert_host`` resource one worker takes (a node offering 4 holds 4 workers)."""
    worker_host: str | None = None
    """Interface expert workers bind; None: their node's Ray IP (127.0.0.1 on a loopback cluster)."""
    ready_timeout_s: float = 1800.0
    """How long ``up``/``scale`` wait for workers to load and the coordinator to serve."""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.replicas < 1:
            raise ValueError(f"workers and replicas must be >= 1, got {self.workers} x {self.replicas}")
        if self.expert_bits not in EXPERT_BITS:
            raise ValueError(f"expert bits must be one of {EXPERT_BITS}, got {self.expert_bits}")
        if self.attn_bits not in ATTN_BITS:
            raise ValueError(f"attention bits must be one of {ATTN_BITS}, got {self.attn_bits}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.device not in (None, "cuda", "cpu") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be cuda or cpu, got {self.device!r}")

    def with_(self, **changes: object) -> DeploySpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def worker_name(self, generation: int, shard: int, replica: int) -> str:
        """Actor name of one worker: generation (bumped by every scale), shard I/N, replica."""
        return f"{self.generation_prefix(generation)}s{shard}of{self.workers}-r{replica}"

    def shards(self) -> list[tuple[int, int]]:
        """Every (shard, replica) pair, replicas of one shard adjacent."""
        return [(i, r) for i in range(self.workers) for r in range(self.replicas)]

    def generation_prefix(self, generation: int) -> str:
        """Name prefix of one generation's worker actors (what the coordinator discovers)."""
        return f"{WORKER_PREFIX}-g{generation}-"

    def coordinator_args(self, ray_address: str, generation: int, port: int, device: str) -> list[str]:
        """``python -m coordinator serve`` arguments: it finds this generation's worker actors through Ray
        (``--ray``), so it can follow a worker that Ray restarted on a new port and read Ray-held experts."""
        # --reuse-port: a replacement coordinator (scale) binds the port while this one still serves.
        args = ["serve", "--model", self.model, "--ray", ray_address, "--ray-namespace", self.namespace,
                "--ray-actor-prefix", self.generation_prefix(generation), "--host", self.host,
                "--port", str(port), "--reuse-port", "--device", device, "--attn-bits", str(self.attn_bits),
                "--prefetch", str(self.prefetch)]
        if self.experts_per_layer is not None:
            args += ["--experts-per-layer", str(self.experts_per_layer)]
        elif self.gpu_memory_gb is not None:
            args += ["--gpu-memory-gb", str(self.gpu_memory_gb)]
        return args
