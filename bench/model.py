"""The benchmark's own batch-1 Mixtral decode loop (bf16 activations, 4-bit attention, packed experts).

Shape legend (one token):

    x        [1, H]          residual stream
    qkv      [1, (nh + 2·nkv)·d] → q [1, nh, 1, d], k/v [1, nkv, 1, d];  KV cache [L, 2, nkv, S, d]
    router   [1, E] → top-k ids/weights [1, k]
    experts  moe_ffn(norm(x), slab, slots[l], weights[l])   (coordinator.gpu_kernels)

A token is L+1 *segments*: segment l runs the MoE of layer l−1, then attention and the router of layer l
(plus, when asked, a guess of layer l+1's experts from the same hidden state); segment L runs the last MoE
and lm_head. Each segment reads its inputs from static device tensors, so it can be captured as a CUDA
graph once per backend and replayed. Between segments the host reads the routed ids (one sync) and lets the
expert backend make the routed experts resident and write their slots; a resident backend computes slots on
the device and needs no sync at all.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from bench.synth import DenseWeights, ModelShape, PackedMatrix
from coordinator import gpu_kernels as gk


class ExpertBackend(Protocol):
    """Where experts live and how they get to the slab the kernels read."""

    name: str
    slab: torch.Tensor
    """uint8 [S, stride] device slots."""
    resident: bool
    """True: slot = layer·E + expert, computed on the device (no host involvement)."""
    speculate: int
    """How many guessed next-layer experts the model should compute for prefetch (0: none)."""

    def prepare(self, layer: int, ids: list[int], guess: list[int]) -> list[int]:
        """Make ``ids`` of ``layer`` resident (copies enqueued on the current stream or waited for by it),
        start prefetches for ``guess`` (experts of layer+1), and return the slot of each id."""
        ...

    def stats(self) -> dict[str, float]:
        ...


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def linear4(x: torch.Tensor, m: PackedMatrix) -> torch.Tensor:
    return gk.packed_linear(x, m.w_q, m.scale, m.zero, m.shape, m.bits, m.group_size)


class DecodeModel:
    """Batch-1 greedy decoding with a pluggable expert backend; eager or CUDA-graphed segments."""

    def __init__(self, shape: ModelShape, dense: DenseWeights, layout: gk.PackedLayout, device: str,
                 max_seq: int = 512, dtype: torch.dtype = torch.bfloat16) -> None:
        self.s, self.w, self.layout, self.dev, self.dtype, self.max_seq = shape, dense, layout, device, dtype, max_seq
        L, H, k = shape.layers, shape.hidden, shape.top_k
        d = shape.head_dim
        self.kv = torch.zeros((L, 2, shape.kv_heads, max_seq, d), device=device, dtype=dtype)
        inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        ang = torch.arange(max_seq, device=device, dtype=torch.float32)[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos(), ang.sin()                          # [S, d/2]
        self.tok = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.x = torch.zeros((1, H), device=device, dtype=dtype)
        self.ffn_in = torch.zeros((L, 1, H), device=device, dtype=dtype)
        self.ids = torch.zeros((L, 1, k), device=device, dtype=torch.int32)
        self.wts = torch.zeros((L, 1, k), device=device, dtype=torch.float32)
        self.slots = torch.zeros((L, 1, k), device=device, dtype=torch.int32)
        self.guess = torch.zeros((L, 8), device=device, dtype=torch.int32)
        # ids (k) + guesses (8) per layer, read by the host after each segment
        self.route_host = torch.zeros((L, k + 8), dtype=torch.int32, pin_memory=device.startswith("cuda"))
        self.slots_host = torch.zeros((L, k), dtype=torch.int32, pin_memory=device.startswith("cuda"))
        self.out_tokens = torch.zeros(4096, dtype=torch.long, device=device)
        # Teacher forcing: the next input is drawn from a fixed random stream, not the argmax. A random model's
        # greedy output loops on one token, which would make routing (and the cache hit rate) meaningless.
        gen = torch.Generator().manual_seed(4321)
        self.forced = torch.randint(0, shape.vocab, (4096,), generator=gen).to(device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.backend: ExpertBackend | None = None
        self.graphs: list[torch.cuda.CUDAGraph] | None = None

    # -------------------------------------------------------------------------------- device segments
    def _attention(self, layer: int, xn: torch.Tensor) -> torch.Tensor:
        s = self.s
        d, nh, nkv = s.head_dim, s.heads, s.kv_heads
        qkv = linear4(xn, self.w.qkv[layer]).view(nh + 2 * nkv, d).float()
        cos, sin = self.cos[self.pos], self.sin[self.pos]                 # [1, d/2]
        x1, x2 = qkv[:, : d // 2], qkv[:, d // 2:]
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        qkv = torch.cat((rot[: nh + nkv], qkv[nh + nkv:]), dim=0).to(self.dtype)
        q, k, v = qkv[:nh], qkv[nh:nh + nkv], qkv[nh + nkv:]
        self.kv[layer, 0].index_copy_(1, self.pos, k[:, None, :])
        self.kv[layer, 1].index_copy_(1, self.pos, v[:, None, :])
        mask = (torch.arange(self.max_seq, device=self.dev) <= self.pos)[None, None, None, :]
        att = F.scaled_dot_product_attention(q[None, :, None, :], self.kv[layer, 0][None], self.kv[layer, 1][None],
                                             attn_mask=mask, enable_gqa=True, scale=1.0 / math.sqrt(d))
        return linear4(att.reshape(1, nh * d), self.w.o[layer])

    def _route(self, layer: int, xn: torch.Tensor, speculate: int) -> None:
        k, E = self.s.top_k, self.s.experts
        probs = torch.softmax((xn @ self.w.router[layer].T).float(), dim=-1)
        w, ids = torch.topk(probs, k, dim=-1)
        self.wts[layer].copy_(w / w.sum(-1, keepdim=True))
        self.ids[layer].copy_(ids)
        if self.backend is not None and self.backend.resident:
            self.slots[layer].copy_(ids + layer * E)
        if speculate and layer + 1 < self.s.layers:
            # mixtral-offloading's trick: layer l+1's router on layer l's post-attention state
            g = rms_norm(self.x, self.w.ffn_norm[layer + 1]) @ self.w.router[layer + 1].T
            self.guess[layer + 1, :speculate].copy_(torch.topk(g.float(), speculate, dim=-1).indices[0])
            self.route_host[layer, k:k + speculate].copy_(self.guess[layer + 1, :speculate], non_blocking=True)
        self.route_host[layer, :k].copy_(self.ids[layer, 0], non_blocking=True)

    def segment(self, l: int) -> None:
        L = self.s.layers
        assert self.backend is not None
        if l == 0:
            self.x.copy_(self.w.embed[self.tok])
        else:
            y = gk.moe_ffn(self.ffn_in[l - 1], self.backend.slab, self.slots[l - 1], self.wts[l - 1], self.layout)
            self.x.add_(y)
        if l < L:
            self.x.add_(self._attention(l, rms_norm(self.x, self.w.attn_norm[l])))
            self.ffn_in[l].copy_(rms_norm(self.x, self.w.ffn_norm[l]))
            self._route(l, self.ffn_in[l], self.backend.speculate)
        else:
            logits = rms_norm(self.x, self.w.final_norm) @ self.w.lm_head.T
            self.out_tokens.index_copy_(0, self.step, torch.argmax(logits, dim=-1))
            self.tok.copy_(self.forced.index_select(0, self.step))
            self.step.add_(1)
            self.pos.add_(1)

    # ------------------------------------------------------------------------------------------- host
    def set_backend(self, backend: ExpertBackend, graphs: bool) -> None:
        self.backend = backend
        self.graphs = None
        if graphs:
            self.graphs = self._capture()

    def _capture(self) -> list[torch.cuda.CUDAGraph]:
        """One graph per segment; warm-up (Triton compiles) on a side stream first, as torch asks."""
        saved = (self.tok.clone(), self.pos.clone(), self.step.clone(), self.kv.clone())
        self.slots.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                for l in range(self.s.layers + 1):
                    self.segment(l)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for l in range(self.s.layers + 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.segment(l)
            graphs.append(g)
        torch.cuda.synchronize()
        self.tok.copy_(saved[0]); self.pos.copy_(saved[1]); self.step.copy_(saved[2]); self.kv.copy_(saved[3])
        return graphs

    def _run_segment(self, l: int) -> None:
        if self.graphs is not None:
            self.graphs[l].replay()
        else:
            self.segment(l)

    def decode_token(self) -> None:
        """One greedy token; the new token id lands in ``self.tok`` and ``self.out_tokens``."""
        be = self.backend
        assert be is not None
        L, k = self.s.layers, self.s.top_k
        stream = torch.cuda.current_stream() if self.dev.startswith("cuda") else None
        guess_here: list[int] = []
        for l in range(L + 1):
            if l > 0 and not be.resident:
                row = self.route_host[l - 1].tolist()
                ids, guess_next = row[:k], row[k:k + be.speculate]
                if be.speculate and l > 1:
                    be.note_guess(l - 1, ids, guess_here)  # type: ignore[attr-defined]
                guess_here = guess_next
                slots = be.prepare(l - 1, ids, guess_next)
                self.slots_host[l - 1] = torch.tensor(slots, dtype=torch.int32)
                self.slots[l - 1, 0].copy_(self.slots_host[l - 1], non_blocking=True)
            self._run_segment(l)
            if l < L and not be.resident and stream is not None:
                stream.synchronize()                      # the routed ids of layer l are on the host now

    def reset(self, prompt: list[int]) -> None:
        """Start a new sequence: feeds the prompt token by token (not timed)."""
        self.pos.zero_(); self.step.zero_(); self.kv.zero_()
        for t in prompt:
            self.tok.fill_(t)
            self.decode_token()
        self.step.zero_()   # out_tokens collects generated tokens only
