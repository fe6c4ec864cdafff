"""The token embedding table in pinned host memory, gathered by the GPU straight from there.

A decode step reads one row of the table (H values: 8 KiB for Mixtral), yet the table (V × H: 262 MB for
Mixtral in bf16) would hold as much device memory as 3–5 expert slots. Pinned host memory is mapped into the
GPU's address space (unified virtual addressing), so a kernel can load the row over the host link itself:
a few microseconds, no host sync, and capturable in a CUDA graph like any other kernel. The gather is one
Triton program per token. Applies on CUDA when lm_head does not share the table (``tie_word_embeddings``).

Shapes: ids [*] int64 (device) -> [*, H] in the table's dtype, on the ids' device.
"""

from __future__ import annotations

import torch
from torch import nn

from coordinator import gpu_kernels as gk

if gk.HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_kernel(ids_ptr, table_ptr, out_ptr, H: tl.constexpr, BLOCK: tl.constexpr):
        """out[t, :] = table[ids[t], :] for token t = program 0's index; BLOCK columns per program 1. Ids are
        not bounds-checked here: the engine refuses prompt ids outside the vocabulary (``generate.validate``)
        and samples only inside it."""
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        row = tl.load(ids_ptr + t).to(tl.int64)
        tl.store(out_ptr + t * H + cols, tl.load(table_ptr + row * H + cols, mask=mask), mask=mask)


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] on the ids' device: the Triton gather where it runs (CUDA ids, table on the device or in
    pinned host memory; or the CPU interpreter), else ``F.embedding``."""
    if not gk._triton_ok(ids):
        return nn.functional.embedding(ids, table)
    flat = ids.reshape(-1).contiguous()
    width = table.shape[1]
    out = torch.empty((flat.numel(), width), device=ids.device, dtype=table.dtype)
    if flat.numel():
        block = min(1024, triton.next_power_of_2(width))
        _gather_kernel[(flat.numel(), triton.cdiv(width, block))](flat, table, out, width, BLOCK=block)
    return out.view(*ids.shape, width)


class HostEmbedding(nn.Module):
    """``nn.Embedding``'s forward over a table kept in pinned host memory. The table is neither a parameter
    nor a buffer, so it is not counted, moved or saved as device state."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        table = weight.detach().to("cpu").contiguous()
        self.__dict__["table"] = table.pin_memory() if torch.cuda.is_available() else table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.__dict__["table"], ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, host memory"


def host_embeddings_apply(model: nn.Module, device: torch.device) -> bool:
    """Whether the table can leave the device: CUDA with Triton, and lm_head keeps its own weight."""
    return device.type == "cuda" and gk.HAVE_TRITON and not model.config.tie_word_embeddings


def move_embeddings_to_host(model: nn.Module) -> int:
    """Replaces the model's ``embed_tokens`` with a ``HostEmbedding`` of the same table; returns the device
    bytes freed."""
    old = model.model.embed_tokens
    model.model.embed_tokens = HostEmbedding(old.weight)
    freed = old.weight.numel() * old.weight.element_size()
    if old.weight.is_cuda:
        del old
        torch.cuda.empty_cache()  # back to the device, not only to torch's cache: the budget counts it free
    return freed
