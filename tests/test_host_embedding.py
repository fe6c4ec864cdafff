"""coordinator.host_embedding: the token table in pinned host memory, gathered by the GPU.

The gather kernel runs here through Triton's CPU interpreter (in a subprocess, as tests/test_gpu_kernels
does); the GPU tests (test_coordinator_gpu) run it from pinned memory, inside a CUDA graph, and check whole
generations against transformers with the table on the host.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from coordinator.host_embedding import HostEmbedding, gather_rows, host_embeddings_apply, move_embeddings_to_host

REPO = Path(__file__).resolve().parents[1]


def test_forward_equals_the_embedding_and_holds_no_module_state() -> None:
    weight = torch.randn(50, 24)
    emb = HostEmbedding(weight)
    ids = torch.tensor([[3, 49, 0], [7, 7, 1]])
    assert torch.equal(emb(ids), nn.functional.embedding(ids, weight))
    assert emb(ids).shape == (2, 3, 24)
    # neither a parameter nor a buffer: not counted as device bytes (model.non_expert_bytes), not moved by .to()
    assert not list(emb.parameters()) and not list(emb.buffers()) and not emb.state_dict()


def test_only_an_untied_table_on_cuda_leaves_the_device(tiny_ckpt: Path) -> None:
    from coordinator.model import ShellSpec, build_shell, non_expert_bytes

    model = build_shell(tiny_ckpt, ShellSpec("cpu", 16, 64, host_embeddings=True))
    assert isinstance(model.model.embed_tokens, nn.Embedding)  # CPU: nothing to gain
    assert not host_embeddings_apply(model, torch.device("cpu"))
    assert host_embeddings_apply(model, torch.device("cuda")) == (not model.config.tie_word_embeddings)
    before = non_expert_bytes(model)
    table = model.model.embed_tokens.weight.detach().clone()
    freed = move_embeddings_to_host(model)
    assert freed == table.numel() * table.element_size() and non_expert_bytes(model) == before - freed
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.model.embed_tokens(ids), table[ids])
    model.config.tie_word_embeddings = True  # lm_head reads the same table every step: it must stay
    assert not host_embeddings_apply(model, torch.device("cuda"))


_CHECK = textwrap.dedent("""
    import torch
    from coordinator.host_embedding import gather_rows
    for dtype, width in ((torch.float32, 96), (torch.bfloat16, 2048 + 64)):   # masked tail; two column blocks
        table = torch.randn(300, width).to(dtype)
        ids = torch.tensor([[299, 0, 5], [5, 17, 128]])
        out = gather_rows(table, ids)
        assert out.shape == (2, 3, width) and out.dtype == dtype, out.shape
        assert torch.equal(out, table[ids]), (out - table[ids]).abs().max()
    assert gather_rows(table, torch.zeros(0, dtype=torch.long)).shape == (0, width)
    print("GATHER OK")
""")


def test_gather_kernel_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-c", _CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "GATHER OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_cpu_ids_read_the_table_directly() -> None:
    table = torch.arange(12.0).view(4, 3)
    assert torch.equal(gather_rows(table, torch.tensor([2, 0])), table[[2, 0]])
