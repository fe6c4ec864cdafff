"""The coordinator's core: model shell + expert cache + generation, one request at a time.

``Coordinator.run`` executes one request on the calling thread (the scheduler's worker thread in the
server); everything it touches (model, KV cache, ExpertCache) is owned by that thread. ``stats`` may be
called from any thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, DynamicCache, GenerationConfig

from coordinator import dequant_ffn, device_memory
from coordinator.cache import ExpertCache, describe_slots, spread_slots
from coordinator.config import GIB, CoordinatorConfig
from coordinator.decode import StaticDecoder, graphs_apply, table_applies
from coordinator.generate import (Detokenizer, GenerateParams, InvalidRequest, RequestCancelled, RequestOutput,
                                  Sampler, TokenCopy, TokenEvent, validate)
from coordinator.model import PackedLinear, ShellSpec, build_shell, cache_kwarg, compute_dtype, non_expert_bytes
from coordinator.moe import RECALL_TOP, ExpertRunner, select_path
from coordinator.partition import SlotPlanner
from coordinator.transfer import Transfers
from expert_workers.format import ExpertKey, ExpertLayout, ExpertManifest, align, meta8_nbytes
from expert_workers.source import ExpertSource

log = logging.getLogger(__name__)
REQUEST_KEYS = ("expert_uses", "cache_hits", "cache_misses", "prefetch_issued", "prefetch_used", "bytes_fetched")
CUDA_CONTEXT_RESERVE = 560 * 2**20
"""Device bytes outside torch's allocator: the CUDA context (527 MiB measured on H100 and H200 with torch 2.11,
bench/NOTES.md item 76), cuBLAS and Triton modules. ``cap_device_memory`` holds the allocator to the rest."""


def load_manifests(source: ExpertSource, layout: ExpertLayout, workers: int) -> dict[ExpertKey, ExpertManifest]:
    """Every expert's manifest (sizes the cache slots), asked for concurrently."""
    keys = layout.all_keys()
    with cf.ThreadPoolExecutor(workers) as pool:
        return dict(zip(keys, pool.map(source.manifest, keys)))


def load_tokenizer(ckpt: Path) -> Any | None:
    """The checkpoint's tokenizer, or None when it has none (token ids still work)."""
    if not any((ckpt / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(ckpt)
    except Exception as e:  # noqa: BLE001 - a broken tokenizer should not stop token-id serving
        log.warning("could not load the tokenizer of %s (%s); only prompt_token_ids will work", ckpt, e)
        return None


def eos_ids(ckpt: Path, config: Any) -> set[int]:
    """EOS ids as generate() uses them: generation_config.json first, then config.json."""
    eos: Any = None
    try:
        eos = GenerationConfig.from_pretrained(ckpt).eos_token_id
    except OSError:
        pass
    if eos is None:
        eos = config.eos_token_id
    return set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])


def _kv_tensors(kv: DynamicCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values [1, kv_heads, T, head_dim] of a transformers 5 cache."""
    return [layer.keys for layer in kv.layers], [layer.values for layer in kv.layers]


def _attention_backends(device: torch.device) -> Any:
    """SDPA without the cuDNN backend on CUDA: it spent ~1.9 ms of CPU per decode call on the H200 (a new
    plan per sequence length), more than the whole layer's GPU work. Flash / memory-efficient / math remain."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def check_layout(layout: ExpertLayout, config: Any) -> None:
    """The workers must serve the model the coordinator loaded."""
    want = (config.num_hidden_layers, config.num_local_experts, config.hidden_size, config.intermediate_size)
    got = (layout.num_layers, layout.num_experts, layout.hidden_size, layout.intermediate_size)
    if want != got:
        raise ValueError(f"expert workers serve (layers, experts, hidden, intermediate) = {got}, "
                         f"the model has {want}: coordinator and workers use different models")


class Coordinator:
    """Serves one Mixtral-architecture model whose experts come from an ExpertSource."""

    def __init__(self, ckpt: Path, source: ExpertSource, config: CoordinatorConfig) -> None:
        self.ckpt = Path(ckpt)
        self.source = source
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r} requested but CUDA is not available (use --device cpu)")
        self.model = build_shell(self.ckpt, ShellSpec(config.device, config.attn_bits, config.attn_group_size,
                                                      config.host_embeddings, config.lm_head_bits))
        mc = self.model.config
        self.layout = source.layout()
        check_layout(self.layout, mc)
        manifests = load_manifests(source, self.layout, config.fetch_workers)
        slot_bytes = align(max(m.nbytes for m in manifests.values()))
        self.max_positions = min(mc.max_position_embeddings, config.max_seq_len or mc.max_position_embeddings)
        self._slot_room: float | None = None  # bytes the budget leaves for slots and spares (``_layer_slots``)
        self.cache = ExpertCache(mc.num_hidden_layers, self._layer_slots(slot_bytes, manifests), config.spares,
                                 slot_bytes, self.device, config.eviction, config.admits_by_worth)
        self.transfers = Transfers(source, self.cache.arena, staging=config.fetch_workers + config.spares,
                                   workers=config.fetch_workers, timeout_s=config.fetch_timeout_s,
                                   zero_copy=config.zero_copy)
        t0 = time.monotonic()
        if n := self.transfers.warm_zero_copy(sorted(manifests, key=lambda k: (k.layer, k.expert))):
            log.info("%d experts readable from co-located shared memory (mapped, checksummed, pinned in %.1f s)",
                     n, time.monotonic() - t0)
        self.runner = ExpertRunner(self.model, self.cache, self.transfers, manifests, config.prefetch,
                                   self._planner(), config.repartition_every)
        self.decoder = self._make_decoder()
        self._decoding: weakref.ref[DynamicCache] | None = None  # the request whose K/V the decoder holds
        self.tokenizer = load_tokenizer(self.ckpt)
        self._max_token_chars: int | None = None  # longest vocabulary entry, computed on first use
        self._live_kv: weakref.WeakSet[DynamicCache] = weakref.WeakSet()  # KV caches still referenced
        self.eos = eos_ids(self.ckpt, mc)
        self.vocab_size = mc.vocab_size
        self.shell_bytes = non_expert_bytes(self.model)
        self._cache_kw = cache_kwarg()
        self._lock = threading.Lock()
        self._totals: dict[str, float] = {"requests": 0, "requests_failed": 0, "requests_cancelled": 0,
                                          "cancelled_generated_tokens": 0,
                                          "prompt_tokens": 0, "generated_tokens": 0, "ttft_ms_sum": 0.0,
                                          "decode_tokens": 0, "decode_seconds": 0.0, "gpu_peak_bytes": 0,
                                          "gpu_peak_reserved_bytes": 0}
        log.info("coordinator ready: %d expert slots (%s) of %d bytes, %d spares, device %s",
                 sum(self.cache.layer_slots), describe_slots(self.cache.layer_slots), slot_bytes, config.spares,
                 self.device)
        if hint := self._meta8_hint(manifests, slot_bytes):
            log.info("%s", hint)

    # -- sizing --------------------------------------------------------------------------------------
    def _meta8_hint(self, manifests: dict[ExpertKey, ExpertManifest], slot_bytes: int) -> str | None:
        """When the budget holds only part of the experts and the workers keep fp16 scales and zeros: how many
        slots 8-bit tables (workers started with ``--meta-bits 8``) would give. At 8 GB on an H100 they
        moved 26% fewer bytes and gave 16% more tokens/s; where every expert fits they cost ~5%."""
        mc = self.model.config
        held, every = sum(self.cache.layer_slots), mc.num_hidden_layers * mc.num_local_experts
        mats = [m for e in manifests.values() for m in e.matrices.values()]
        room = self._slot_room
        if room is None or held >= every or any(m.bits == 16 or m.meta_bits != 16 for m in mats):
            return None
        slot8 = align(max(meta8_nbytes(e) for e in manifests.values()))
        if slot8 >= slot_bytes:  # small matrices: a 256-entry table outweighs their groups' fp16 meta
            return None
        more = min(self._slots_in(room, slot8), every)
        return (f"the budget holds {held} of {every} experts; with 8-bit scale/zero tables (workers started with "
                f"--meta-bits 8) each is {slot8 / 1e6:.2f} MB instead of {slot_bytes / 1e6:.2f} and it would "
                f"hold {more}")

    def _slots_in(self, room: float, slot_bytes: int) -> int:
        """Cache slots of ``slot_bytes`` that ``room`` bytes hold once the spare buffers have theirs."""
        return int((room - self.config.spares * slot_bytes) // slot_bytes)

    @property
    def slots_per_layer(self) -> int:
        """k: the smallest layer's LRU slots (``ExpertCache.slots_per_layer``)."""
        return self.cache.slots_per_layer

    def _kv_bytes(self, dtype: torch.dtype) -> int:
        mc = self.model.config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * head_dim * dtype.itemsize
        return per_token * self.max_positions

    def _workspace_bytes(self, dtype: torch.dtype, manifests: dict[ExpertKey, ExpertManifest]) -> int:
        """Device bytes a request needs beyond weights, KV cache and expert slots, at the longest prompt:
        dequantized weights, prefill activations, logits and the CUDA context. On hqq's path a prefill
        dequantizes whole experts (room for two, which also covers an attention projection between them); the
        GPU paths keep two row blocks (``dequant_ffn.DEQUANT_CHUNK``) and add the largest attention projection
        a prefill dequantizes. A quantized lm_head the GEMV does not read (hqq's own forward) adds its whole
        dequantized weight; a ``PackedLinear`` one dequantizes nothing (a prefill keeps one token's logits)."""
        mc = self.model.config
        hidden, inter, size = mc.hidden_size, mc.intermediate_size, dtype.itemsize
        if select_path(self.device, self.model.model.layers[0].mlp.experts.act_fn, manifests).name == "hqq":
            weights = 2 * 3 * hidden * inter * size
        else:
            head_dim = getattr(mc, "head_dim", None) or hidden // mc.num_attention_heads
            qkv_rows = (mc.num_attention_heads + 2 * mc.num_key_value_heads) * head_dim
            attention = qkv_rows * hidden * size if self.config.attn_bits < 16 else 0
            weights = dequant_ffn.workspace_bytes(dtype) + attention
        if self.config.lm_head_bits < 16 and not isinstance(self.model.lm_head, PackedLinear):
            weights += mc.vocab_size * hidden * size  # hqq's forward dequantizes the whole lm_head per call
        activations = 8 * min(self.max_positions, self.config.prefill_chunk) * (hidden + 2 * inter) * size
        slack = self.config.allocator_slack_mib * device_memory.MIB  # holes the allocator cannot lend
        context = CUDA_CONTEXT_RESERVE + slack if self.device.type == "cuda" else 0
        return weights + activations + 2 * mc.vocab_size * 4 + context

    def _layer_slots(self, slot_bytes: int, manifests: dict[ExpertKey, ExpertManifest]) -> list[int]:
        """LRU slots of each layer: k from the config, or every slot the memory budget leaves after weights,
        KV cache and workspace. The budget buys whole slots, not whole layers: k each, and the remainder
        one more each in layers spread evenly over the depth (at 8 GB Mixtral gets 2.8 per layer, not 2)."""
        cfg, mc = self.config, self.model.config
        layers, experts = mc.num_hidden_layers, mc.num_local_experts
        if cfg.experts_per_layer is not None:
            return [min(cfg.experts_per_layer, experts)] * layers
        budget = cfg.gpu_memory_gb * GIB if cfg.gpu_memory_gb is not None else None
        if budget is None and self.device.type == "cuda":
            budget = torch.cuda.mem_get_info(self.device)[0] * 0.9 + torch.cuda.memory_allocated(self.device)
        if budget is None:
            return [experts] * layers
        dtype = compute_dtype(mc, self.device)
        workspace = self._workspace_bytes(dtype, manifests)
        room = budget - non_expert_bytes(self.model) - self._kv_bytes(dtype) - workspace
        self._slot_room = room
        total = self._slots_in(room, slot_bytes)
        if total < layers:
            # rounded up: the figure printed is enough (rounded to nearest, a tiny model's need read the same
            # as the budget it refused)
            need = math.ceil((budget - room + (cfg.spares + layers) * slot_bytes) / GIB * 1000) / 1000
            raise ValueError(f"a {budget / GIB:.3f} GiB budget leaves no room for one expert per layer; "
                             f"need at least {need:.3f} GiB")
        return spread_slots(min(total, layers * experts), layers)

    def _planner(self) -> SlotPlanner | None:
        """The slot planner when the budget sized the cache and some layer cannot hold every expert
        (``experts_per_layer`` fixes k in every layer). Its floor keeps a token's experts in every layer, so
        the decode path chosen for these slots stays valid."""
        mc = self.model.config
        slots = self.cache.layer_slots
        if self.config.experts_per_layer is not None or min(slots) >= mc.num_local_experts:
            return None
        return SlotPlanner(mc.num_hidden_layers, mc.num_local_experts,
                           floor=min(mc.num_experts_per_tok, min(slots)))

    # -- requests ------------------------------------------------------------------------------------
    def prepare(self, params: GenerateParams) -> list[int]:
        """Tokenizes and validates a request (raises InvalidRequest); cheap, runs on the caller's thread."""
        if params.prompt_token_ids:
            ids = list(params.prompt_token_ids)
        elif params.prompt:
            if self.tokenizer is None:
                raise InvalidRequest("this model has no tokenizer: send prompt_token_ids instead of text")
            self._check_prompt_chars(params)
            ids = list(self.tokenizer(params.prompt)["input_ids"])
        else:
            ids = []
        validate(params, ids, self.vocab_size, self.max_positions)
        return ids

    def _check_prompt_chars(self, params: GenerateParams) -> None:
        """Refuses, before tokenizing, a text that cannot fit: no token spans more characters than the longest
        vocabulary entry, so a longer text has too many tokens (tokenizing 16 MB would block for a minute)."""
        if self._max_token_chars is None:
            self._max_token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        room = self.max_positions - max(params.max_new_tokens, 1)
        if room <= 0:
            raise InvalidRequest(f"max_new_tokens ({params.max_new_tokens}) leaves no room for a prompt in the "
                                 f"model's {self.max_positions} positions")
        if len(params.prompt) > room * self._max_token_chars:
            raise InvalidRequest(f"prompt of {len(params.prompt)} characters has more than {room} tokens: prompt + "
                                 f"max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                                 f"{self.max_positions} positions")

    def generate(self, params: GenerateParams) -> list[TokenEvent]:
        """Runs a request to completion on this thread (tests, benchmarks); the server uses the scheduler."""
        events: list[TokenEvent] = []
        self.run(params, self.prepare(params), events.append)
        return events

    def run(self, params: GenerateParams, prompt_ids: Sequence[int], emit: Callable[[TokenEvent], None],
            cancelled: Callable[[], bool] = lambda: False, arrived: float | None = None) -> None:
        """Prefill + decode, emitting each token, then a final event with finish reason and stats.

        Tokens are picked on the device. Pipelined (``CoordinatorConfig.pipeline``), step t+1 is queued with
        token t still on the device, and token t is read and emitted once step t+1's first segments run: the
        device does not wait for the host between tokens. A stop token is then known one step late; that
        step's output is dropped."""
        arrived = time.monotonic() if arrived is None else arrived
        before = self.runner.stats()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        out = RequestOutput(params, Detokenizer(self.tokenizer, prompt_ids), emit, cancelled, self.eos)
        sampler = Sampler(params.temperature, params.top_p, params.seed)
        kv = self.new_kv_cache()
        try:
            with torch.inference_mode():
                pending = TokenCopy(sampler.pick(self.step(prompt_ids, kv)))
                while True:
                    if len(out.generated) + 1 >= params.max_new_tokens:  # pending is the last token: no step
                        out.deliver(pending)
                        break
                    logits = self._advance(pending, kv, out)
                    out.check_cancelled()
                    if out.finish or logits is None:
                        break
                    pending = TokenCopy(sampler.pick(logits))
        except RequestCancelled:
            self._count("requests_cancelled")
            self._count("cancelled_generated_tokens", len(out.generated))
            raise
        except BaseException as e:
            self._count("requests_failed")
            if isinstance(e, torch.cuda.OutOfMemoryError) and self.device.type == "cuda":
                log.warning("out of device memory: %s", device_memory.by_pool(self.device))
            raise
        stats = self._request_stats(prompt_ids, out.generated, arrived, out.first_at, before)
        emit(TokenEvent(None, out.detok.flush(), out.finish, stats))

    def _advance(self, pending: TokenCopy, kv: DynamicCache, out: RequestOutput) -> torch.Tensor | None:
        """Delivers ``pending`` and runs the step it feeds: the logits, or None when the request ended with it."""
        if self.config.pipeline:  # the step is queued first; the token is delivered once its first segments run
            return self.step(pending.device_token, kv, during=functools.partial(out.deliver, pending))
        out.deliver(pending)
        return None if out.finish or out.cancel_seen else self.step(pending.device_token, kv)

    def new_kv_cache(self) -> DynamicCache:
        try:
            kv = DynamicCache(config=self.model.config)
        except TypeError:  # older signature
            kv = DynamicCache()
        self._live_kv.add(kv)  # stats "kv_caches_live": a finished or cancelled request's cache must be gone
        return kv

    def step(self, ids: Sequence[int] | torch.Tensor, kv: DynamicCache,
             during: Callable[[], None] | None = None) -> torch.Tensor:
        """One forward pass over ``ids`` (token ids, or a [1] int64 device tensor) appended to the KV cache;
        the last position's logits [V] (float32). ``during`` runs once, when the step can spare the host
        (the static decoder: once its first segments are queued; transformers' forward: first).
        Single-token steps after the prefill go to the static decoder when there is one: it takes the
        request's K/V over at its first step and keeps it from then on."""
        held = self._decoding() if self._decoding is not None else None
        with _attention_backends(self.device):
            if self.decoder is not None and len(ids) == 1 and (held is kv or kv.get_seq_length() > 0):
                if held is not kv:
                    self.decoder.adopt(*_kv_tensors(kv))
                    self._decoding = weakref.ref(kv)
                token = ids if isinstance(ids, torch.Tensor) else ids[0]
                return self.decoder.step(token, during).clone()
            if held is kv:
                raise RuntimeError("this KV cache is held by the static decoder: only single tokens may follow")
            if during is not None:
                during()
            input_ids = (ids.view(1, -1) if isinstance(ids, torch.Tensor)
                         else torch.tensor([list(ids)], dtype=torch.long, device=self.device))
            *head, last = input_ids.split(self.config.prefill_chunk, dim=1)  # bounded activations
            for chunk in head:
                self.model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{self._cache_kw: kv})
            out = self.model(input_ids=last, use_cache=True, logits_to_keep=1, **{self._cache_kw: kv})
            return out.logits[0, -1].float()

    def _make_decoder(self) -> StaticDecoder | None:
        """The decode path the config asks for (``CoordinatorConfig.decode``)."""
        mode, fits = self.config.decode, graphs_apply(self.runner, self.device)
        if mode == "auto":
            mode = "graphs" if fits else "transformers"
        if mode == "transformers":
            if self.config.prefetch_ahead > 1:
                log.warning("prefetch_ahead %d applies to the static/graph decoder only; transformers' forward "
                            "guesses one layer ahead", self.config.prefetch_ahead)
            return None
        if mode == "graphs" and not fits:
            raise ValueError("decode 'graphs' needs CUDA, the fused Triton expert kernels (SiLU, 2/4/8-bit u8 "
                             "experts) and at least as many cache slots per layer as experts per token")
        return StaticDecoder(self.model, self.runner, self.max_positions, graphs=mode == "graphs",
                             ahead=self.config.prefetch_ahead, table=table_applies(self.runner, self.device),
                             speculate=self.config.speculate)

    # -- stats ---------------------------------------------------------------------------------------
    def _count(self, key: str, n: float = 1) -> None:
        with self._lock:
            self._totals[key] += n

    def _request_stats(self, prompt_ids: Sequence[int], generated: Sequence[int], arrived: float,
                       first_at: float, before: dict[str, float]) -> dict[str, float]:
        end = time.monotonic()
        after = self.runner.stats()
        cuda = self.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else 0
        # what the allocator held (allocated + its cached blocks): the device footprint, less the CUDA context
        reserved = torch.cuda.max_memory_reserved(self.device) if cuda else 0
        decode_s = end - first_at
        stats = {"prompt_tokens": len(prompt_ids), "generated_tokens": len(generated),
                 "ttft_ms": (first_at - arrived) * 1e3,
                 "decode_tokens_per_s": (len(generated) - 1) / decode_s if len(generated) > 1 and decode_s > 0
                 else 0.0,
                 **{k: after[k] - before[k] for k in REQUEST_KEYS},
                 "remote_compute_calls": 0, "gpu_peak_bytes": peak, "gpu_peak_reserved_bytes": reserved}
        stats |= self._ratios(stats, {k: after[k] - before.get(k, 0) for k in after})
        with self._lock:
            t = self._totals
            t["requests"] += 1
            t["prompt_tokens"] += len(prompt_ids)
            t["generated_tokens"] += len(generated)
            t["ttft_ms_sum"] += stats["ttft_ms"]
            t["decode_tokens"] += max(0, len(generated) - 1)
            t["decode_seconds"] += decode_s if len(generated) > 1 else 0.0
            t["gpu_peak_bytes"] = max(t["gpu_peak_bytes"], peak)
            t["gpu_peak_reserved_bytes"] = max(t["gpu_peak_reserved_bytes"], reserved)
        return stats

    def _ratios(self, stats: dict[str, float], counters: dict[str, float]) -> dict[str, float]:
        uses = stats["expert_uses"]
        predicted = counters["prefetch_predicted"]
        n = min(max(self.config.prefetch, 1), max(RECALL_TOP))
        out = {"hit_rate": stats["cache_hits"] / uses if uses else 0.0,
               "prefetch_recall": counters[f"prefetch_found_top{n}"] / predicted if predicted else 0.0}
        for k in RECALL_TOP:
            out[f"prefetch_recall_top{k}"] = counters[f"prefetch_found_top{k}"] / predicted if predicted else 0.0
        return out

    def stats(self) -> dict[str, float]:
        """Server-wide stats since start: INTERFACE.md keys, plus hit rate, recall, per-layer counters."""
        with self._lock:
            t = dict(self._totals)
        counters = self.runner.stats()
        done = t["requests"]
        out = {"prompt_tokens": t["prompt_tokens"], "generated_tokens": t["generated_tokens"],
               "ttft_ms": t["ttft_ms_sum"] / done if done else 0.0,
               "decode_tokens_per_s": t["decode_tokens"] / t["decode_seconds"] if t["decode_seconds"] else 0.0,
               **counters, "remote_compute_calls": 0, "gpu_peak_bytes": t["gpu_peak_bytes"],
               "gpu_peak_reserved_bytes": t["gpu_peak_reserved_bytes"],
               "requests": done, "requests_failed": t["requests_failed"],
               "requests_cancelled": t["requests_cancelled"],
               "cancelled_generated_tokens": t["cancelled_generated_tokens"], "kv_caches_live": len(self._live_kv),
               "slots_per_layer": self.slots_per_layer, "cache_slots": sum(self.cache.layer_slots),
               **{f"layer{i}_slots": n for i, n in enumerate(self.cache.layer_slots)},
               "cache_bytes": self.cache.nbytes,
               "non_expert_bytes": self.shell_bytes}
        if self.decoder is not None:  # segments queued before their layer's routing was read, and redone
            out |= {"decode_segments_speculated": self.decoder.speculated,
                    "decode_segments_redone": self.decoder.redone}
        # the expert source's own counters (failovers, checksum_failures, deadline_exceeded, ...), prefixed
        out |= {f"source_{k}": float(v) for k, v in self.source.stats().items()}
        return out | self._ratios(out, counters)

    def cap_device_memory(self) -> int | None:
        """Holds this process's torch allocator to ``gpu_memory_gb`` less ``CUDA_CONTEXT_RESERVE``, so that the
        device footprint, blocks the allocator caches included, stays under the cap: near the limit it frees
        its cached blocks instead of asking the driver for more (after a long prefill it had cached 0.19 GB
        above the budget, item 76). Process-wide, so the serving process calls it, not a library user sharing
        the device. Returns the limit in bytes; None when there is no cap or no CUDA device."""
        if self.config.gpu_memory_gb is None or self.device.type != "cuda":
            return None
        limit = int(self.config.gpu_memory_gb * GIB) - CUDA_CONTEXT_RESERVE
        torch.cuda.empty_cache()  # loading's temporaries, so the limit starts from what is live
        index = device_memory.index_of(self.device)
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
        log.info("device memory: torch's allocator capped at %.3f GiB (%.3f GiB less the context reserve)",
                 limit / GIB, self.config.gpu_memory_gb)
        return limit

    def close(self) -> None:
        self.runner.close()
        self.transfers.close()
