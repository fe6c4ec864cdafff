"""Coordinator settings: one frozen dataclass, the CLI maps onto it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

GIB = 2**30
DECODE_MODES = ("auto", "graphs", "static", "transformers")
EVICTIONS = ("lru", "lrfu")
"""Expert cache eviction policies (``coordinator.cache``)."""
ATTN_BITS = (4, 8, 16)
"""hqq bits of attention and lm_head; 16 = as in the checkpoint."""


def default_device() -> str:
    """cuda when present, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class CoordinatorConfig:
    """How the coordinator places the model and its expert cache."""

    device: str = "cpu"
    """torch device for the non-expert weights, the KV cache and the expert cache ("cuda", "cuda:1", "cpu")."""
    experts_per_layer: int | None = None
    """LRU slots per layer (k). None: derived from ``gpu_memory_gb``, or every expert when that is None too
    (on CUDA: from the free device memory)."""
    gpu_memory_gb: float | None = None
    """Device memory budget for everything the coordinator allocates (weights, KV cache, expert cache,
    workspace); sets k when ``experts_per_layer`` is None."""
    prefetch: int = 2
    """Experts of layer l+1 to prefetch after layer l (0 = off); also the number of spare buffers per guess."""
    prefetch_ahead: int = 1
    """Layers guessed ahead by the static/graph decoder: 1, or 2 to also prefetch layer l+2's likely experts
    (found less often, but twice as early: ``bench/prefetch_reach``) whenever the copy engine is idle. Spare
    buffers: prefetch x this."""
    repartition_every: int = 32
    """Steps between two plans of how many cache slots each layer gets, from the decode traffic each layer saw
    (``coordinator.partition``): layers that route alike keep few slots, those that spread get more. Applies
    when the memory budget sizes the cache; 0 keeps the even spread, as does ``experts_per_layer``."""
    eviction: str = "lrfu"
    """Which expert a full layer of the cache evicts: "lru" (least recently used, mixtral-offloading's policy)
    or "lrfu" (least recency-weighted use count: an expert the layer keeps coming back to stays;
    ``coordinator.cache``)."""
    admission: bool = True
    """With LRFU eviction: a miss (or a used prefetched expert) joins its layer's LRU only when its worth beats
    the entry it would evict (``ExpertCache.admits``); otherwise it is computed from a prefetch spare and only
    remembered (with no spare to give, it is admitted). 10-16% fewer misses on CPU replays; on the GPU 9% fewer
    bytes and +9% tokens/s at 8 GB, +4.5% with 3-bit experts at 12 GB (bench/NOTES.md items 65, 66, 70).
    Ignored under "lru", which admits every miss as mixtral-offloading does."""
    attn_bits: int = 4
    """hqq bits for attention q/k/v/o: 4, 8 or 16 (as in the checkpoint)."""
    attn_group_size: int = 64
    """hqq group size for attention (and for lm_head when ``lm_head_bits`` < 16)."""
    lm_head_bits: int = 16
    """hqq bits for lm_head: 4, 8 or 16 (as in the checkpoint). Mixtral's lm_head is 262 MB in bf16 and 74 MB
    at 4 bits, three more 2-bit expert slots under a memory cap (``model._quantize_lm_head``); an lm_head tied
    to the embedding table is refused. Off by default, since it changes the model's output: with 2-bit experts
    on an H100 it made decode 4–9% faster at 8 GB and 7% at 12 GB, with 3-bit experts no faster
    (bench/NOTES.md item 73)."""
    allocator_slack_mib: int = 256
    """On CUDA under ``gpu_memory_gb``: MiB of the cap the plan leaves unplanned, for the holes torch's allocator
    holds but cannot lend (blocks free inside segments that also hold live tensors). With fixed segments 233 MiB
    of them refused a 32 MiB block; with expandable segments (``coordinator serve``'s default) 97–127 MiB
    (bench/NOTES.md item 77). Each 55 MB less is one more 2-bit Mixtral expert slot."""
    max_seq_len: int | None = None
    """Longest prompt + generation; None = the model's max_position_embeddings. Sizes the KV reserve."""
    prefill_chunk: int = 512
    """Prompt tokens per forward pass: a longer prompt is prefilled in chunks of this many, so what a prefill
    holds (activations, each expert's batch) is bounded by the chunk, not by ``max_seq_len``, and the memory
    budget leaves the rest to expert slots. Smaller chunks cost time: each chunk touches most experts again."""
    max_queue: int = 16
    """Requests waiting beyond the running one; more are refused with RESOURCE_EXHAUSTED."""
    fetch_workers: int = 4
    """Expert transfers in flight at once (threads calling ExpertSource.fetch_into)."""
    fetch_timeout_s: float = 30.0
    """Per-expert fetch timeout; beyond it the request fails with UNAVAILABLE."""
    decode: str = "auto"
    """How single-token decode steps run: "graphs" (static buffers replayed as CUDA graphs, ``coordinator.decode``;
    needs CUDA, the fused expert kernels and ``experts_per_layer`` >= experts per token), "static" (the same
    code without graphs), "transformers" (the model's own forward), "auto" (graphs where they apply, else
    transformers). Prefill always runs transformers' forward."""
    speculate: bool = True
    """Static/graph decoder: queue segment l+1 before layer l's routing is read, on the bet that its experts
    are where the rows table says (redone when not), so the GPU does not wait for the host between layers."""
    pipeline: bool = True
    """Queue decode step t+1 with token t still on the device (picked there by the sampler) and read token t
    on the host while step t+1 runs, so the device does not wait for the host between tokens. A stop token
    costs one step of discarded work."""
    zero_copy: bool = True
    """Copy straight from a co-located worker's shared memory when the source offers it (else always fetch
    through the source's transport into staging)."""
    host_embeddings: bool = True
    """On CUDA, keep the token embedding table in pinned host memory, gathered by the GPU from there
    (``coordinator.host_embedding``), so its bytes buy expert slots; not when lm_head shares the table."""

    def __post_init__(self) -> None:
        if self.experts_per_layer is not None and self.gpu_memory_gb is not None:
            raise ValueError("give experts_per_layer or gpu_memory_gb, not both")
        if self.experts_per_layer is not None and self.experts_per_layer < 1:
            raise ValueError(f"experts_per_layer must be >= 1, got {self.experts_per_layer}")
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            raise ValueError(f"gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.prefetch_ahead not in (1, 2):
            raise ValueError(f"prefetch_ahead must be 1 or 2, got {self.prefetch_ahead}")
        if self.attn_bits not in ATTN_BITS or self.lm_head_bits not in ATTN_BITS:
            raise ValueError(f"attn_bits and lm_head_bits must be one of {ATTN_BITS}, got {self.attn_bits} and "
                             f"{self.lm_head_bits}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        if self.repartition_every < 0:
            raise ValueError(f"repartition_every must be >= 0, got {self.repartition_every}")
        if self.allocator_slack_mib < 0:
            raise ValueError(f"allocator_slack_mib must be >= 0, got {self.allocator_slack_mib}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.max_queue < 0 or self.fetch_workers < 1:
            raise ValueError("max_queue must be >= 0 and fetch_workers >= 1")

    @property
    def admits_by_worth(self) -> bool:
        """Whether the cache runs admission: asked for, and LRFU worths to compare."""
        return self.admission and self.eviction == "lrfu"

    @property
    def spares(self) -> int:
        """Spare buffers for prefetched experts: one per expert each guess may prefetch."""
        return self.prefetch * self.prefetch_ahead

    def with_(self, **changes: object) -> CoordinatorConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


EXACT = CoordinatorConfig(attn_bits=16)
"""No quantization on the coordinator side (pair with workers at --expert-bits 16)."""
