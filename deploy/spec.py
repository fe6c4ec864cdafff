"""What a deployment is: its settings (``DeploySpec``) and the names of its Ray actors."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

NAMESPACE = "moe-serving"
"""Ray namespace of a deployment's named actors (``--namespace`` picks another, for several deployments)."""
COORDINATOR_ACTOR = "moe-coordinator"
"""Name of the actor that runs and supervises the coordinator process."""
WORKER_PREFIX = "expert-worker"
"""Prefix of expert worker actor names (the one ``coordinator --ray`` discovery looks for)."""
EXPERT_BITS = (2, 3, 4, 8, 16)
META_BITS = (16, 8)  # expert_workers.format's too (which imports torch)
ATTN_BITS = (4, 8, 16)  # coordinator.config's too
DECODE_MODES = ("auto", "graphs", "static", "transformers")  # coordinator.config's (which imports torch)
EVICTIONS = ("lru", "lrfu")  # coordinator.config's too


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
    """Interface the coordinator binds (anything but loopback needs ``auth_token_file``)."""
    expert_bits: int = 2
    """hqq bits of the experts; 16 = unquantized (exact mode with ``attn_bits`` 16)."""
    group_size: int = 64
    """hqq group size of the experts."""
    meta_bits: int = 16
    """Bits of each expert group's scale and zero: 16, or 8 (table codes, ``QuantSpec.meta_bits``)."""
    attn_bits: int = 4
    """hqq bits of the coordinator's attention projections; 16 = as in the checkpoint."""
    lm_head_bits: int = 16
    """hqq bits of the coordinator's lm_head (``CoordinatorConfig.lm_head_bits``); 16 = as in the checkpoint."""
    device: str | None = None
    """Coordinator device ("cuda" / "cpu"); None: cuda when the coordinator's node has a GPU."""
    experts_per_layer: int | None = None
    """Coordinator cache slots per layer (k); None: derived from ``gpu_memory_gb`` / the coordinator default."""
    gpu_memory_gb: float | None = None
    """Coordinator device memory budget (sets the cache size)."""
    prefetch: int = 2
    """Next-layer experts the coordinator prefetches (0 = off)."""
    prefetch_ahead: int = 1
    """Layers the coordinator's decoder guesses ahead (1 or 2; ``CoordinatorConfig.prefetch_ahead``)."""
    repartition_every: int = 32
    """Steps between two plans of each layer's cache slots (0: evenly spread;
    ``CoordinatorConfig.repartition_every``)."""
    eviction: str = "lrfu"
    """Which expert a full cache layer evicts: "lru" or "lrfu" (``CoordinatorConfig.eviction``)."""
    admission: bool = True
    """Whether a miss must be worth more than the entry it would evict to join the cache
    (``CoordinatorConfig.admission``)."""
    decode: str = "auto"
    """How the coordinator runs single-token steps (``CoordinatorConfig.decode``)."""
    speculate: bool = True
    """Whether the coordinator's decoder queues a segment before the previous layer's routing is read
    (``CoordinatorConfig.speculate``)."""
    pipeline: bool = True
    """Whether the coordinator queues decode step t+1 before reading token t (``CoordinatorConfig.pipeline``)."""
    namespace: str = NAMESPACE
    """Ray namespace of the deployment's actors."""
    expert_host: float = 1.0
    """Units of the ``expert_host`` resource one worker takes (a node offering 4 holds 4 workers)."""
    worker_host: str | None = None
    """Interface expert workers bind; None: their node's Ray IP with ``auth_token_file`` (reachable from other
    machines), else 127.0.0.1 (only a coordinator on the same machine reaches them)."""
    auth_token_file: str | None = None
    """Shared token file (absolute path, present on every node that runs a worker or the coordinator; each
    process reads it itself, so the secret never travels through Ray or a command line). Expert workers require
    the token from every caller, the coordinator sends it to them and requires it from its own clients."""
    tls_cert: str | None = None
    """Server certificate chain (PEM path on every node) of the workers and the coordinator: TLS on both hops.
    It must name the addresses they bind (a certificate per host at the same path works)."""
    tls_key: str | None = None
    """Private key of ``tls_cert`` (PEM path on every node)."""
    tls_root: str | None = None
    """CA certificate (PEM path) that signed ``tls_cert`` (the certificate itself when self-signed): how the
    coordinator, ``deploy status`` and ``up`` verify the servers."""
    ready_timeout_s: float = 1800.0
    """How long ``up``/``scale`` wait for workers to load and the coordinator to serve."""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.replicas < 1:
            raise ValueError(f"workers and replicas must be >= 1, got {self.workers} x {self.replicas}")
        if self.expert_bits not in EXPERT_BITS:
            raise ValueError(f"expert bits must be one of {EXPERT_BITS}, got {self.expert_bits}")
        if self.meta_bits not in META_BITS:
            raise ValueError(f"meta bits must be one of {META_BITS}, got {self.meta_bits}")
        if self.attn_bits not in ATTN_BITS or self.lm_head_bits not in ATTN_BITS:
            raise ValueError(f"attention and lm_head bits must be one of {ATTN_BITS}, got {self.attn_bits} and "
                             f"{self.lm_head_bits}")
        if self.prefetch < 0 or self.prefetch_ahead not in (1, 2) or self.repartition_every < 0:
            raise ValueError(f"prefetch and repartition_every must be >= 0 and prefetch_ahead 1 or 2, got "
                             f"{self.prefetch}, {self.repartition_every}, {self.prefetch_ahead}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.device not in (None, "cuda", "cpu") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be cuda or cpu, got {self.device!r}")
        self._check_security()

    def _check_security(self) -> None:
        tls = (self.tls_cert, self.tls_key, self.tls_root)
        if any(tls) and not all(tls):
            raise ValueError("TLS needs all of --tls-cert, --tls-key and --tls-root (the CA that signed the "
                             "certificate; the certificate itself when it is self-signed)")
        for path in (self.auth_token_file, *tls):
            if path is not None and not os.path.isabs(path):
                raise ValueError(f"{path} must be an absolute path (it is read on other nodes, in other "
                                 "directories)")

    def check_files(self) -> None:
        """Reads the token and TLS files here, as the coordinator on this node will: ValueError for a missing or
        empty one, before anything starts. (Workers on other nodes read their own copies.)"""
        from expert_workers.security import load_token

        try:
            if self.auth_token_file:
                load_token(self.auth_token_file)  # checked, not kept: the processes read it themselves
            for path in (self.tls_cert, self.tls_key, self.tls_root):
                if path is not None:
                    Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None

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
                "--lm-head-bits", str(self.lm_head_bits), "--prefetch", str(self.prefetch),
                "--prefetch-ahead", str(self.prefetch_ahead),
                "--repartition-every", str(self.repartition_every), "--eviction", self.eviction,
                "--decode", self.decode] + ([] if self.speculate else ["--no-speculate"])
        args += [] if self.pipeline else ["--no-pipeline"]
        args += [] if self.admission else ["--no-admission"]
        if self.experts_per_layer is not None:
            args += ["--experts-per-layer", str(self.experts_per_layer)]
        elif self.gpu_memory_gb is not None:
            args += ["--gpu-memory-gb", str(self.gpu_memory_gb)]
        if self.auth_token_file:  # the path, never the token: command lines are world-readable (ps)
            args += ["--auth-token-file", self.auth_token_file]
        if self.tls_cert and self.tls_key and self.tls_root:
            args += ["--tls-cert", self.tls_cert, "--tls-key", self.tls_key, "--worker-tls-root", self.tls_root]
        return args
