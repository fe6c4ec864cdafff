"""Batch-1 decode over static buffers: transformers' Mixtral weights, one token per step, CUDA-graphed.

transformers' eager forward costs ~50 kernel launches per layer plus Python per module (and, on the H200,
~1.9 ms of CPU per cuDNN attention call): ~55 ms per Mixtral token before a single expert moves. This path
computes the same function from the same modules' weights over buffers whose addresses never change, so
each piece between two host decisions can be captured once as a CUDA graph and replayed.

Shape legend (one token; L layers, H hidden, nh/nkv query/kv heads of d, G = nh/nkv, K experts per token,
P guesses, S positions, V vocab):

    xs[s % 2]   [1, 1, H]        residual stream after segment s (two buffers: a redone segment's input stays)
    q           [nkv, G, d]      the G query heads sharing kv head j, as G query rows (exact GQA, no repeat)
    kv          [L, 2, nkv, S, d] keys / values after rotary; row p = position p
    ffn_in[l]   [1, H]           post-attention-norm input of layer l's experts
    ids/wts[l]  [1, K]           routed experts and their weights (layer l's own router)
    rows[l]     [E]              arena row of each expert of layer l (host-written when the cache changes)
    slots       [1, K]           rows[l][ids[l]]: arena rows of the routed experts, gathered on the device
    route_host  [L, K + P + P2]  pinned: ids of layer l, the guess for layer l+1, then (ahead 2) for l+2

A token is L+1 *segments*; segment l runs layer l−1's experts, then layer l's attention and router, and a
guess of layer l+1's experts from the same post-attention state (layer l+1's router through its norm: the
mixtral-offloading trick). Between segments the host reads ``route_host[l]`` (the one wait per layer),
starts the prefetch of the guess and makes layer l's routed experts resident; only when that moved one does it
write ``rows[l]`` (at a hit, the common case, nothing goes up to the device). Segment L
runs the last experts, the final norm and lm_head.

*Speculation* (``speculate``, the default): segment l+1 is queued before the host has read layer l's routing,
gathering its rows from ``rows`` as the table stands. When the routed experts turn out to be resident in
those rows (the common case) the result stands, and the GPU never waited for the host between segments. When
the cache had to move one, the host fixes ``rows[l]`` and queues segment l+1 again behind the wrong one: it
reads ``xs[l % 2]``, which the wrong run did not write, and rewrites everything the wrong run wrote (K/V row,
routing, residual). A miss costs no more than before, since its copy (~1 ms) outlasts the discarded segment.

Attention reads only the first ``span`` positions of the cache: the smallest power of two (≥ MIN_SPAN) that
holds the sequence, so a 32k-position model decoding a short chat does not scan 32k keys per layer; graphs
are captured once per span, when a sequence first needs it.

Eager mode (CPU, tests) runs the same segments without graphs; its experts go through
``ExpertRunner.forward`` (hqq's exact path), so CPU tests check this code against transformers token for token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from coordinator.moe import ExpertRunner, RECALL_TOP
from coordinator.norm_kernels import FusedRMSNorm

GUESS_TOP = max(RECALL_TOP)
MIN_SPAN = 256


class StaticDecoder:
    """Single-token steps for one sequence at a time, on the buffers of one coordinator."""

    def __init__(self, model: nn.Module, runner: ExpertRunner, max_positions: int, graphs: bool,
                 ahead: int = 1, table: bool = False, speculate: bool = True) -> None:
        cfg = model.config
        self.model, self.runner, self.layers = model, runner, model.model.layers
        attn = self.layers[0].self_attn
        self.L, self.H, self.K = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts_per_tok
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
        self.scaling, self.window = attn.scaling, getattr(cfg, "sliding_window", None)
        # the final norm, not the embedding table (it may be on the host) nor lm_head (it may be packed)
        self.S, self.dev = max_positions, model.model.norm.weight.device
        self.dtype = model.model.norm.weight.dtype
        self.P = min(cfg.num_local_experts, GUESS_TOP) if runner.prefetch > 0 else 0
        self.P2 = min(cfg.num_local_experts, runner.prefetch) if ahead > 1 else 0  # prefetched, not scored
        self.graphs_wanted = graphs
        # table: experts gathered through the host-kept ``rows`` table (graphs need it; CPU and plain CUDA runs
        # may use it too), else each layer through ``ExpertRunner.run_layer``
        self.table = table or graphs
        self.speculate = speculate and self.table
        self.speculated = self.redone = 0  # segments queued before their routing was checked / queued again
        # graphs: transformers' RMSNorm modules as one fused launch each (checked against the module first)
        norm = FusedRMSNorm.wrap if graphs else (lambda m: m)
        self.input_norm = [norm(layer.input_layernorm) for layer in self.layers]
        self.post_norm = [norm(layer.post_attention_layernorm) for layer in self.layers]
        self.final_norm = norm(model.model.norm)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # span -> one graph per segment
        self._pool: object | None = None  # one CUDA graph memory pool shared by every span's graphs
        self.span = min(MIN_SPAN, max_positions)
        dev, L, K = self.dev, self.L, self.K
        self.kv = torch.zeros((L, 2, self.nkv, self.S, self.d), device=dev, dtype=self.dtype)
        positions = torch.arange(self.S, device=dev)
        cos, sin = model.model.rotary_emb(self.kv[0, 0, :1, :1], positions[None])  # [1, S, d] as transformers
        self.cos, self.sin = cos[0], sin[0]
        self.positions = positions
        self.tok = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.xs = torch.zeros((2, 1, 1, self.H), device=dev, dtype=self.dtype)
        self.ffn_in = torch.zeros((L, 1, self.H), device=dev, dtype=self.dtype)
        self.ids = torch.zeros((L, 1, K), device=dev, dtype=torch.long)
        self.wts = torch.zeros((L, 1, K), device=dev, dtype=torch.float32)
        self.logits = torch.zeros(cfg.vocab_size, device=dev, dtype=torch.float32)
        pin = dev.type == "cuda"
        self.route_host = torch.zeros((L, K + self.P + self.P2), dtype=torch.long, pin_memory=pin)
        self.rows = torch.zeros((L, cfg.num_local_experts), device=dev, dtype=torch.int32)
        self.rows_host = torch.zeros((L, cfg.num_local_experts), dtype=torch.int32, pin_memory=pin)
        # numpy views of the pinned rows and per-layer tensor views, made once: between two graph replays the
        # GPU waits for this host code, and each torch indexing op costs microseconds
        self._route_np, self._rows_np = self.route_host.numpy(), self.rows_host.numpy()
        self._rows_pairs = [(self.rows_host[layer], self.rows[layer]) for layer in range(L)]
        self.length = 0  # positions filled (host mirror of ``pos``)
        self._stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None
        self._done = [torch.cuda.Event() for _ in range(L + 1)] if self._stream is not None else []

    # -- sequence ------------------------------------------------------------------------------------
    def adopt(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Takes over a sequence after its prefill: per layer K/V [1, nkv, T, d] (transformers' cache)."""
        n = keys[0].shape[-2]
        if n >= self.S:
            raise ValueError(f"sequence of {n} positions leaves no room in {self.S}")
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.kv[layer, 0, :, :n].copy_(k[0])
            self.kv[layer, 1, :, :n].copy_(v[0])
        self.pos.fill_(n)
        self.length = n

    def step(self, token: int | torch.Tensor, during: Callable[[], None] | None = None) -> torch.Tensor:
        """Appends ``token`` (an id, or a [1] int64 device tensor a sampler wrote, read without a host sync)
        and returns the next position's logits [V] (float32). ``during`` runs once, as soon as the first
        segments are queued: host work (delivering the previous token) that then overlaps them."""
        if self.length >= self.S:
            raise ValueError(f"no position left: the decoder holds {self.S}")
        self.span = self._span_for(self.length + 1)
        graphs = self.graphs.get(self.span) if self.graphs_wanted else None
        if self.graphs_wanted and graphs is None:
            graphs = self.graphs[self.span] = self._capture()
        if isinstance(token, torch.Tensor):
            self.tok.copy_(token.view(1, 1))
        else:
            self.tok.fill_(token)
        self.runner.begin_step()
        if self.table:
            self._table_step(graphs, during)
        else:
            for seg in range(self.L + 1):
                self.segment(seg)  # each layer's experts through run_layer, which reads its routing itself
                if seg == 0 and during is not None:
                    during()
        self.length += 1
        return self.logits

    def _table_step(self, graphs: list[torch.cuda.CUDAGraph] | None, during: Callable[[], None] | None) -> None:
        """One token of segments; between two, the host settles the layer the second one computes."""
        self._launch(0, graphs)
        for layer in range(self.L):
            seg = layer + 1
            if self.speculate:
                self._launch(seg, graphs)  # before layer's routing is known: rows as the table stands
                self.speculated += 1
            if during is not None:  # segments 0 (and 1) are queued: the device has work while the host does this
                during()
                during = None
            if self._done:
                self._done[layer].synchronize()  # route_host[layer] is on the host now
            buffers, moved = self._before_segment(seg)
            if not self.speculate:
                self._launch(seg, graphs)
            elif moved:
                self._redo(seg, graphs)
            self.runner.after_compute(buffers)
            self._predict(seg)  # after the segment is queued: this host work overlaps it

    def _launch(self, seg: int, graphs: list[torch.cuda.CUDAGraph] | None) -> None:
        if graphs is not None:
            graphs[seg].replay()
        else:
            self.segment(seg)
        if self._done:
            self._done[seg].record(self._stream)

    def _redo(self, seg: int, graphs: list[torch.cuda.CUDAGraph] | None) -> None:
        """Queues segment seg again, behind its speculative run, which gathered a stale row."""
        self.redone += 1
        if seg == self.L:
            self.pos.sub_(1)  # the discarded run advanced the position already
        self._launch(seg, graphs)

    # -- host, between segments ----------------------------------------------------------------------
    def _before_segment(self, seg: int) -> tuple[list[int], bool]:
        """Table mode, for segment seg: layer seg−1's routed experts made resident (their arena rows in
        ``rows``, which the segment gathers). Returns the buffers for ``after_compute`` and whether anything
        moved: a row was loaded or changed owner, so a segment that gathered before this read a stale one.
        The guess for layer seg is prefetched only after this: issued first, it could take the spare buffer of
        a prefetched expert that layer seg−1 is about to use."""
        layer = seg - 1
        ids, table = self._route_np[layer, :self.K], self._rows_np[layer]
        rows, buffers, all_hit = self.runner.resident_rows(layer, [ids.tolist()])
        stale = bool((table[ids] != rows[0]).any())
        if stale:  # the cache moved one of them: the device's copy of the row is stale
            table[ids] = rows[0]  # the last copy out of this row finished: a wait came since
            host, device = self._rows_pairs[layer]
            device.copy_(host, non_blocking=True)  # ~25 µs of host time, hence only on a change
        return buffers, stale or not all_hit

    def _predict(self, layer: int) -> None:
        """Prefetches the guess for ``layer`` made in the previous segment (once that layer's experts ran)."""
        if self.P and 0 < layer < self.L:
            self.runner.predict(layer, self._route_np[layer - 1, self.K:self.K + self.P].tolist())
        if self.P2 and 0 < layer < self.L - 1:  # two segments before layer+1 runs, behind the nearer guess
            self.runner.predict_ahead(layer + 1, self._route_np[layer - 1, self.K + self.P:].tolist())

    def _span_for(self, n: int) -> int:
        """Cache positions attention reads for a sequence of ``n``: a power of two, at least MIN_SPAN, at most S."""
        span = MIN_SPAN
        while span < n:
            span *= 2
        return min(span, self.S)

    # -- device segments -----------------------------------------------------------------------------
    def segment(self, seg: int) -> None:
        """Layer seg−1's experts, then layer seg's attention and routing (or, for seg = L, the logits)."""
        x = self.xs[seg % 2]  # written here from xs[(seg - 1) % 2], which stays intact for a redo
        if seg == 0:
            x.copy_(self.model.model.embed_tokens(self.tok))
        else:
            torch.add(self.xs[(seg - 1) % 2], self._experts(seg - 1).view(1, 1, self.H), out=x)
        if seg == self.L:
            normed = self.final_norm(x)
            self.logits.copy_(self.model.lm_head(normed)[0, -1].float())
            self.pos.add_(1)
            return
        layer = self.layers[seg]
        x.add_(self._attention(seg, layer.self_attn, self.input_norm[seg](x)))
        normed = self.post_norm[seg](x)
        self.ffn_in[seg].copy_(normed.view(1, self.H))
        # transformers' MixtralTopKRouter: softmax in float32, top-k, renormalized over the k
        probs = torch.softmax(F.linear(normed.view(1, self.H), layer.mlp.gate.weight).float(), dim=-1)
        weights, ids = torch.topk(probs, self.K, dim=-1)
        self.wts[seg].copy_(weights / weights.sum(dim=-1, keepdim=True))
        self.ids[seg].copy_(ids)
        self.route_host[seg, :self.K].copy_(ids[0], non_blocking=True)
        for ahead, width, col in ((1, self.P, self.K), (2, self.P2, self.K + self.P)):
            if width and seg + ahead < self.L:  # layer seg+ahead's router on this state, through its norm
                nxt = self.layers[seg + ahead]
                guess = F.linear(self.post_norm[seg + ahead](x).view(1, self.H), nxt.mlp.gate.weight)
                self.route_host[seg, col:col + width].copy_(torch.topk(guess.float(), width, dim=-1).indices[0],
                                                           non_blocking=True)

    def _experts(self, layer: int) -> torch.Tensor:
        """[1, H]: the routing-weighted experts of ``layer`` on ``ffn_in[layer]``."""
        if self.table:
            slots = self.rows[layer][self.ids[layer]]  # gathered here: the table as the host last wrote it
            return self.runner.moe_rows(self.ffn_in[layer], slots, self.wts[layer])
        out = self.runner.run_layer(layer, self.ffn_in[layer], self.ids[layer], self.wts[layer])
        self._predict(layer + 1)
        return out

    def _attention(self, layer: int, attn: nn.Module, xn: torch.Tensor) -> torch.Tensor:
        """[1, 1, H]: transformers' MixtralAttention for one token at position ``pos``, over the static cache."""
        nh, nkv, d = self.nh, self.nkv, self.d
        if hasattr(attn, "qkv_proj"):  # one GEMV for q, k and v (coordinator.model.FusedQKV)
            qkv = attn.qkv_proj(xn).view(nh + 2 * nkv, d)
            qk, v = qkv[:nh + nkv], qkv[nh + nkv:]
        else:
            qk = torch.cat((attn.q_proj(xn).view(nh, d), attn.k_proj(xn).view(nkv, d)))
            v = attn.v_proj(xn).view(nkv, d)
        cos, sin = self.cos[self.pos], self.sin[self.pos]  # [1, d]
        qk = qk * cos + _rotate_half(qk) * sin  # q and k rotated together: one set of launches
        q, k = qk[:nh], qk[nh:]
        self.kv[layer, 0].index_copy_(1, self.pos, k[:, None, :])
        self.kv[layer, 1].index_copy_(1, self.pos, v[:, None, :])
        span = self.span
        positions = self.positions[:span]
        visible = positions <= self.pos
        if self.window is not None:
            visible &= positions > self.pos - self.window
        out = F.scaled_dot_product_attention(q.view(nkv, nh // nkv, d), self.kv[layer, 0, :, :span],
                                             self.kv[layer, 1, :, :span], attn_mask=visible[None, None, :],
                                             scale=self.scaling)
        return attn.o_proj(out.reshape(1, 1, nh * d))

    # -- CUDA graphs ---------------------------------------------------------------------------------
    def _capture(self) -> list[torch.cuda.CUDAGraph]:
        """One graph per segment for the current span, captured at the current position (its K/V row is
        rewritten by the real step); warm-up (Triton compiles) on a side stream first, as torch asks."""
        saved_pos = self.pos.clone()
        # Under a capped allocator (Coordinator.cap_device_memory) a capture cannot make room by freeing the
        # blocks a prefill left cached, since the allocator frees nothing while a capture is underway: free them now.
        torch.cuda.empty_cache()
        try:
            side = torch.cuda.Stream(self.dev)
            side.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(side):
                for seg in range(self.L + 1):
                    self.segment(seg)
            torch.cuda.current_stream(self.dev).wait_stream(side)
            if not self.graphs:
                # the first capture, or every earlier one is gone: a pool that no live graph holds may still be
                # known to the allocator with no users (a capture that ran out of memory part-way leaves it so),
                # and capturing into it again trips torch's internal assert "use_count > 0" on every later
                # request (bench/NOTES.md item 82): a new one
                self._pool = torch.cuda.graph_pool_handle()
            graphs = []
            for seg in range(self.L + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    self.segment(seg)
                graphs.append(graph)
            torch.cuda.synchronize(self.dev)
        finally:
            self.pos.copy_(saved_pos)
        return graphs


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def table_applies(runner: ExpertRunner, device: torch.device) -> bool:
    """Experts gathered through the rows table need room for all K routed experts of a token in a layer's
    slots, and ``ExpertRunner.moe_rows`` without host syncs (the fused kernels) or on the CPU (tests)."""
    top_k = runner.layers[0].mlp.gate.top_k
    return runner.cache.slots_per_layer >= top_k and (device.type == "cpu" or runner.path.layout is not None)


def graphs_apply(runner: ExpertRunner, device: torch.device) -> bool:
    """CUDA graphs need every decode step's experts computed by one ``moe_ffn`` over the arena: the layer
    path, and room for all K routed experts of a token in a layer's slots."""
    return device.type == "cuda" and runner.path.layout is not None and table_applies(runner, device)
