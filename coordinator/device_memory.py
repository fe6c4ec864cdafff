"""The serving process's hold on device memory: how torch's caching allocator is set up under a cap, and what it
holds when a request runs out (which pool keeps the free bytes)."""
from __future__ import annotations

import os

import torch

MIB = 2**20


def index_of(device: torch.device) -> int:
    """The CUDA device's index (torch's allocator calls want one; a bare ``torch.device("cuda")`` is refused)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def expandable_segments(enabled: bool = True) -> bool:
    """Lets the allocator grow and shrink one mapped segment per pool, and unmap the pages of any free block,
    instead of caching fixed segments: under a tight cap, holes left in segments that also hold live tensors
    refused a 32 MiB block while ~200 MiB sat free (bench/NOTES.md item 77). Applies to blocks allocated from
    now on, so the serving process calls it before loading; ``enabled`` False turns it off again (tests). A
    user's own allocator configuration wins. True when the setting was applied."""
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return False
    # torch 2.13 moved the setter and deprecated the old name; 2.11 (the GPU machine's) may have only that one
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    (setter or torch.cuda.memory._set_allocator_settings)(f"expandable_segments:{enabled}")
    return True


def by_pool(device: torch.device) -> str:
    """Reserved and free MiB of each allocator pool on ``device`` (the default pool, each CUDA graph's private
    one), for the log when a request runs out of memory: free bytes in a graph's pool cannot serve anyone else."""
    index = index_of(device)
    pools: dict[tuple[int, int], list[int]] = {}
    for seg in torch.cuda.memory_snapshot():
        if seg.get("device", index) != index:
            continue
        held = pools.setdefault(tuple(seg.get("segment_pool_id", (0, 0))), [0, 0])
        held[0] += seg["total_size"]
        held[1] += seg["total_size"] - seg["allocated_size"]
    return "; ".join(f"{'default pool' if pool == (0, 0) else f'pool {pool}'}: {held / MIB:.0f} MiB reserved, "
                     f"{free / MIB:.0f} free" for pool, (held, free) in sorted(pools.items()))
