"""Replays text through the coordinator in decode order (one token per step, teacher-forced) and reports what
the expert cache and the prefetcher saw: hit rate per k and prefetch recall, the figures
../shared/models/README.md lists for code-moe-22m."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from coordinator.cache import ExpertCache
from coordinator.config import CoordinatorConfig
from coordinator.engine import Coordinator
from expert_workers.source import ExpertSource


def cache_step(cache: ExpertCache, layer: int, used: list[int], admission: bool = False) -> None:
    """One MoE step's cache bookkeeping in the order ExpertRunner keeps (resident and prefetched experts
    first, then the misses into victims this step does not need), without moving any bytes: for replaying a
    routing trace through the cache alone (tests/test_cache.py, bench/cache_bound.py). ``admission``: a miss
    the cache does not admit (``ExpertCache.admits``) is only remembered, as if computed from a transient
    buffer."""
    todo = set(used)
    found = cache.lookup(layer, used)
    for f in found:
        if f.buffer is not None:
            todo.discard(f.expert)
            if f.prefetched:
                cache.promote(layer, f.expert, todo)
    for f in found:
        if f.buffer is None:
            if admission and not cache.admits(layer, f.expert, todo):
                cache.remember(layer, f.expert)
            else:
                cache.insert(layer, f.expert, cache.take_victim(layer, todo), None)  # type: ignore[arg-type]
            todo.discard(f.expert)


def replay(ckpt: Path, source: ExpertSource, config: CoordinatorConfig,
           sequences: Sequence[Sequence[int]]) -> dict[str, float]:
    """Counters after feeding every sequence token by token through a fresh coordinator (cache kept
    across sequences, KV cache per sequence)."""
    engine = Coordinator(ckpt, source, config)
    try:
        with torch.inference_mode():
            for ids in sequences:
                kv = engine.new_kv_cache()
                for token in ids:
                    engine.step([token], kv)
        return engine.stats()
    finally:
        engine.close()


def replay_main(args: argparse.Namespace) -> int:
    from coordinator.__main__ import engine_config, open_source
    from coordinator.engine import load_tokenizer
    from modelzoo import resolve_model

    ckpt = resolve_model(args.model)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        raise ValueError(f"{ckpt} has no tokenizer to turn the replay files into tokens")
    sequences = [tokenizer(Path(f).read_text(errors="replace"))["input_ids"][:args.tokens] for f in args.files]
    source = open_source(args)
    print(f"{len(sequences)} sequences, {sum(map(len, sequences))} tokens, prefetch {args.prefetch}")
    print("k  hit_rate  prefetch_used/issued  recall@1  recall@2  recall@3")
    try:
        for k in (int(x) for x in args.k.split(",")):
            s = replay(ckpt, source, engine_config(args, experts_per_layer=k, gpu_memory_gb=None), sequences)  # type: ignore[arg-type]
            used = f"{s['prefetch_used']:.0f}/{s['prefetch_issued']:.0f}"
            print(f"{k}  {s['hit_rate']:.3f}     {used:>20}  {s['prefetch_recall_top1']:.3f}     "
                  f"{s['prefetch_recall_top2']:.3f}     {s['prefetch_recall_top3']:.3f}", flush=True)
    finally:
        source.close()  # type: ignore[attr-defined]
    return 0
