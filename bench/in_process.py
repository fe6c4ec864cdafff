"""The coordinator in the benchmark's own process, reading the workers' shared memory: the (c) row as
mixtral-offloading builds it, and the diagnoses of (d)'s decode step (cProfile / torch.profiler, timelines).
``bench.system_bench`` calls these once its worker processes serve."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench import report


def offloading_eager(ckpt: Path, addrs: str, cap: float, prompt: list[int], args: Any, ctx_bytes: int,
                     log: Callable[[str], None], over_budget: Callable[[float], bool], rows: list[dict[str, Any]],
                     expert_bytes: int, bits: int = 2) -> None:
    """(c) as mixtral-offloading builds it: transformers' own eager forward (one launch per op, no CUDA graphs),
    a per-layer LRU of k experts, a miss copied on demand from pinned host memory, no prefetch. It runs in this
    process on our Coordinator (``decode="transformers"``, prefetch 0, same cap and so the same slots as (d),
    kept evenly spread and evicting the least recently used: ``repartition_every=0``, ``eviction="lru"``, as
    mixtral-offloading does); the
    experts are read from the workers' shared memory, registered with cudaHostRegister, i.e. pinned memory.
    Inputs are teacher-forced from the same random stream as (a)-(c)."""
    from coordinator.config import CoordinatorConfig
    from coordinator.engine import Coordinator
    from expert_workers.fetch import RemoteSource

    name, n = "c_offloading_eager", max(16, args.new_tokens // 2)
    if over_budget(40 + n * 0.08):
        rows.append(report.skipped(name, bits, cap, "time budget"))
        return
    src = RemoteSource(addrs.split(","))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() if cuda else 0
    co = None
    try:  # a cap with no room for the slots is a failed row too, not the end of the table
        co = Coordinator(ckpt, src, CoordinatorConfig(
            device="cuda" if cuda else "cpu", gpu_memory_gb=cap * 1e9 / 2**30, max_seq_len=512, prefetch=0,
            fetch_workers=8, decode="transformers", repartition_every=0, eviction="lru"))
        row = {"variant": name, "bits": bits, "cap_gb": cap, **_lru_timing(co, prompt, args.warmup, n),
               "expert_bytes": expert_bytes,
               "vram_peak_bytes": (torch.cuda.max_memory_allocated() - base if cuda else 0) + ctx_bytes,
               "vram_note": "peak allocated by this coordinator (above the bench loop's own) + CUDA context"}
        rows.append(row)
        log(f"{name:28s} bits={bits} cap={cap} k={row['k']}: {row['tokens_per_s']:.2f} tok/s "
            f"({row['ms_per_token']:.2f} ms/token) hit={row['hit_rate']:.3f} "
            f"MB/token={row['bytes_per_token'] / 1e6:.1f} vram={row['vram_peak_bytes'] / 1e9:.2f} GB")
    except Exception as e:  # noqa: BLE001 - record the failure, keep the other runs
        rows.append(report.skipped(name, bits, cap, e))
        log(f"{name} cap={cap} failed: {e}")
    finally:
        if co is not None:
            co.close()
        src.close()
        del co
        if cuda:
            torch.cuda.empty_cache()


def _lru_timing(co: Any, prompt: list[int], warmup: int, n: int) -> dict[str, Any]:
    """(c)'s measured part of a row: ``prompt``, ``warmup`` steps, then ``n`` timed steps teacher-forced from
    a fixed random stream, with the cache's counters over the timed ones."""
    stream = torch.randint(0, co.vocab_size, (warmup + n,), generator=torch.Generator().manual_seed(4321)).tolist()
    if co.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        kv = co.new_kv_cache()
        co.step(prompt, kv)
        _timed_steps(co, kv, stream[:warmup])
        before = co.runner.stats()
        ms = _timed_steps(co, kv, stream[warmup:])
        after = co.runner.stats()
    d = {k: after[k] - before[k] for k in ("expert_uses", "cache_hits", "cache_misses", "bytes_fetched")}
    return {"k": sum(co.cache.layer_slots) / len(co.cache.layer_slots), "tokens": n, "graphs": False,
            "ms_per_token": ms, "tokens_per_s": 1e3 / ms, **d,
            "hit_rate": d["cache_hits"] / d["expert_uses"] if d["expert_uses"] else 0.0,
            "prefetch_recall": None, "bytes_per_token": d["bytes_fetched"] / n, "token_ids": []}


def profile_coordinator(ckpt: Path, addrs: str, cap: float, prompt: list[int], args: Any,
                        log: Callable[[str], None], rows: list[dict[str, Any]], tokens: int = 24) -> None:
    """The coordinator's own decode step (``Coordinator.step``) in this process: ms/token plain (prefetch on
    and off), then under cProfile and torch.profiler (where its per-token time goes). Printed, stored as a row."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from coordinator.config import CoordinatorConfig
    from coordinator.engine import Coordinator
    from coordinator.generate import GenerateParams
    from expert_workers.fetch import RemoteSource

    gen = torch.Generator().manual_seed(7)
    stream = torch.randint(0, 32000, (2 * tokens,), generator=gen).tolist()
    src = RemoteSource(addrs.split(","))
    text, plain = "", {}
    for prefetch in (int(str(args.sys_prefetch).split(",")[0].split(":")[0]), 0):
        co = Coordinator(ckpt, src, CoordinatorConfig(device="cuda", gpu_memory_gb=cap * 1e9 / 2**30,
                                                      max_seq_len=512, prefetch=prefetch, fetch_workers=8))
        try:
            with torch.inference_mode():
                kv = co.new_kv_cache()
                co.step(prompt, kv)
                _timed_steps(co, kv, stream[:tokens // 2])  # warm-up: cache fills, kernels compile
                plain[prefetch] = _timed_steps(co, kv, stream[tokens // 2:tokens])
                log(f"coordinator.step at {cap} GB, prefetch {prefetch}: {plain[prefetch]:.1f} ms/token, "
                    f"path {co.runner.path.name}")
                if prefetch == 0:
                    continue
                prof = cProfile.Profile()
                prof.enable()
                ms = _timed_steps(co, kv, stream[tokens:])
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
                pstats.Stats(prof, stream=out).sort_stats("cumtime").print_stats(30)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
                    _timed_steps(co, kv, stream[:4])
                table = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                                max_name_column_width=60)
                text = f"{ms:.1f} ms/token under cProfile\n{out.getvalue()}\ntorch.profiler, 4 tokens:\n{table}"
                # the engine's own loop (sampling, detokenizing, emitting) without gRPC: what it adds to a step;
                # last, since its request takes the static decoder over from ``kv``
                events = co.generate(GenerateParams(prompt_token_ids=tuple(prompt), max_new_tokens=tokens,
                                                    temperature=1.0, seed=1))
                plain["run"] = 1e3 / events[-1].stats["decode_tokens_per_s"]
                log(f"Coordinator.run (temperature 1, no gRPC): {plain['run']:.1f} ms/token")
        finally:
            co.close()
    src.close()
    log(f"coordinator.step profile at {cap} GB:\n" + text[-14000:])
    rows.append({"variant": "profile_coordinator_step", "bits": 2, "cap_gb": cap, "profile": text,
                 "skipped": "diagnosis only: ms/token " + ", ".join(f"{k if k == 'run' else f'prefetch {k}'}: {v:.1f}"
                                                                    for k, v in plain.items())})


def timelines(ckpt: Path, addrs: str, caps: list[float], settings: list[tuple[str, list[str]]],
              prompt: list[int], args: Any, log: Callable[[str], None], rows: list[dict[str, Any]],
              bits: int) -> None:
    """``--timeline``: each cap and ``--sys-prefetch`` setting (``settings``, as ``prefetch_settings`` gives
    them) once under torch.profiler (``bench.timeline``), stored as rows the report prints apart."""
    from bench import timeline

    for cap in caps:
        for suffix, flags in settings:
            name = "timeline" + suffix
            try:
                device = "cuda" if args.device.startswith("cuda") else "cpu"
                found = timeline.profile_decode(ckpt, addrs, cap, flags, prompt, args.timeline_tokens,
                                                Path(args.out), log, device, bits)
            except Exception as e:  # noqa: BLE001 - a diagnosis, not a run
                import traceback
                traceback.print_exc()
                found = {"error": f"{type(e).__name__}: {e}"[:300]}
            rows.append({"variant": name, "bits": bits, "cap_gb": cap, "skipped": "diagnosis: timeline", **found})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _timed_steps(co: Any, kv: Any, tokens: list[int]) -> float:
    """ms per decode step over ``tokens``, synchronized."""
    cuda = co.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for t in tokens:
        co.step([t], kv)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / len(tokens)
