"""(d) and (e): the real system — expert workers as separate plain processes holding the experts in POSIX
shared memory, the coordinator as its own process, requests through the Python client — on a synthetic
Mixtral-8x7B-shaped checkpoint.

No 93 GB fp16 step: the checkpoint directory holds config.json and the non-expert tensors only; each
worker's on-disk quantization cache (the format ``expert_workers.cache`` writes) is filled directly with the
benchmark's pre-quantized expert templates, so ``python -m expert_workers serve`` finds a valid cache, skips
quantization, and loads the shard into shared memory exactly as in production.
(d) coordinator reads co-located workers' shm zero-copy (cudaHostRegister'ed); (e) ``--no-zero-copy``: every
expert travels over gRPC streaming, what a remote expert host gets. The coordinator is the plain
``python -m coordinator serve`` (its CUDA fast paths, coordinator.gpu_kernels, are chosen at start).
Requests sample with temperature 1 (a random model's greedy output loops on one token).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench.synth import ModelShape, spec_of
from expert_workers.format import ExpertManifest, QuantSpec, quant_fingerprint

READY = re.compile(r"serving on (\S+:\d+)")
REPO = Path(__file__).resolve().parents[1]


def write_checkpoint(path: Path, shape: ModelShape, device: str, seed: int = 5, dense: Any = None) -> Path:
    """config.json + model.safetensors with every non-expert tensor (bf16); no expert tensors. With ``dense``
    (bench.synth.DenseWeights) the tensors are the benchmark loop's own, attention dequantized from its packed
    4-bit weights (the coordinator quantizes them again), so (d)/(e) serve the model (a)–(c) run; else random."""
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    path.mkdir(parents=True, exist_ok=True)
    cfg = MixtralConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.inter,
                        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                        num_key_value_heads=shape.kv_heads, num_local_experts=shape.experts,
                        num_experts_per_tok=shape.top_k, max_position_embeddings=4096, rope_theta=1e6,
                        tie_word_embeddings=False)
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(path)
    gen = torch.Generator(device=device).manual_seed(seed)
    H, d = shape.hidden, shape.head_dim

    def rnd(*s: int, scale: float) -> torch.Tensor:
        return (torch.randn(*s, generator=gen, device=device) * scale).to(torch.bfloat16).cpu()

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(shape.vocab, H, scale=1.0),
                                  "lm_head.weight": rnd(shape.vocab, H, scale=H ** -0.5),
                                  "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        t[p + "self_attn.q_proj.weight"] = rnd(shape.heads * d, H, scale=H ** -0.5)
        t[p + "self_attn.k_proj.weight"] = rnd(shape.kv_heads * d, H, scale=H ** -0.5)
        t[p + "self_attn.v_proj.weight"] = rnd(shape.kv_heads * d, H, scale=H ** -0.5)
        t[p + "self_attn.o_proj.weight"] = rnd(H, shape.heads * d, scale=H ** -0.5)
        t[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        t[p + "block_sparse_moe.gate.weight"] = rnd(shape.experts, H, scale=H ** -0.5)
    if dense is not None:
        t |= _dense_tensors(shape, dense)
    save_file(t, str(path / "model.safetensors"))
    return path


def _dense_tensors(shape: ModelShape, dense: Any) -> dict[str, torch.Tensor]:
    """The loop's non-expert weights under the checkpoint's names (q/k/v split from its fused qkv)."""
    from coordinator import gpu_kernels as gk

    def unpack(m: Any) -> torch.Tensor:
        return gk.dequantize(m.w_q, m.scale, m.zero, m.shape, m.bits, m.group_size, f"{m.bits}bit_u8",
                             torch.bfloat16).cpu()

    def host(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).cpu().contiguous()

    nq, nkv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    t = {"model.embed_tokens.weight": host(dense.embed), "lm_head.weight": host(dense.lm_head),
         "model.norm.weight": host(dense.final_norm)}
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        qkv, o = unpack(dense.qkv[layer]), unpack(dense.o[layer])
        t[p + "self_attn.q_proj.weight"] = qkv[:nq].contiguous()
        t[p + "self_attn.k_proj.weight"] = qkv[nq:nq + nkv].contiguous()
        t[p + "self_attn.v_proj.weight"] = qkv[nq + nkv:].contiguous()
        t[p + "self_attn.o_proj.weight"] = o
        t[p + "input_layernorm.weight"] = host(dense.attn_norm[layer])
        t[p + "post_attention_layernorm.weight"] = host(dense.ffn_norm[layer])
        t[p + "block_sparse_moe.gate.weight"] = host(dense.router[layer])
    return t


def write_worker_caches(ckpt: Path, root: Path, spec: QuantSpec, shards: int,
                        templates: list[tuple[np.ndarray, ExpertManifest]]) -> str:
    """Every shard's quantization cache, expert (l, e) = template (l·E + e) mod T; returns the quant
    fingerprint. Same files, same index and checks as a cache the workers built themselves."""
    from expert_workers.cache import ShardCache
    from expert_workers.checkpoint import open_checkpoint
    from expert_workers.store import ShardSpec

    ck = open_checkpoint(ckpt)
    qfp = quant_fingerprint(ck.fingerprint, spec)
    for i in range(shards):
        cache = ShardCache(root, qfp, f"shard-{i}of{shards}")
        settings = {**spec.as_dict(), "shard": [i, shards]}
        with cache.locked(), cache.writer(ck.fingerprint, ck.stamp(), settings) as w:
            for key in ShardSpec.parse(f"{i}/{shards}").keys(ck.layout):
                buf, man = templates[(key.layer * ck.layout.num_experts + key.expert) % len(templates)]
                w.add(buf, dataclasses.replace(man, key=key, fingerprint=qfp))
    return qfp


IN_LOOP_ALLOC_CONF = "expandable_segments:False"
"""The allocator setting of the bench's own process (rows (a)–(p), as in every earlier table)."""


class Proc:
    """A ``python -m ...`` server; waits for its 'serving on' line, echoes its output to a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str], timeout: float = 300) -> None:
        self.log = open(log_path, "w")
        self.p = subprocess.Popen([sys.executable, "-u", "-m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.address: str | None = None
        found = threading.Event()

        def pump() -> None:
            assert self.p.stdout is not None
            for line in self.p.stdout:
                self.log.write(line)
                self.log.flush()
                if self.address is None and (m := READY.search(line)):
                    self.address = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout) or self.address is None:
            self.stop()
            raise RuntimeError(f"{' '.join(args[:2])} did not come up; see {log_path}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(8)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self.log.close()


SUMMED = ("prompt_tokens", "generated_tokens", "expert_uses", "cache_hits", "cache_misses", "prefetch_issued",
          "prefetch_used", "bytes_fetched")
"""Per-request counters that add up over the timed requests of one row."""


def _run_requests(address: str, prompt: list[int], warmup: int, tokens: int,
                  requests: int = 1) -> tuple[dict[str, Any], float]:
    """A warm-up request (seed 1), then ``requests`` timed ones of ``tokens`` + 1 (seeds 2, 3, ...): each samples
    its own token stream, so their sum averages over routing traces (one 128-token trace moved ±8% of the
    bytes of another in session 8). Counters are summed; decode_tokens_per_s is decoded tokens over decode
    time and the prefetch recalls are weighted by tokens, all requests together; the other stats (ttft_ms,
    gpu_peak_bytes, gpu_peak_reserved_bytes) are the last request's."""
    from client import Client

    c = Client(address, timeout_s=900)
    c.generate(prompt_token_ids=prompt, max_new_tokens=warmup, temperature=1.0, seed=1)
    t0 = time.perf_counter()
    runs = [dict(c.generate(prompt_token_ids=prompt, max_new_tokens=tokens + 1, temperature=1.0, seed=2 + i).stats)
            for i in range(requests)]
    wall = time.perf_counter() - t0
    stats = dict(runs[-1])
    for key in SUMMED:
        stats[key] = sum(r[key] for r in runs)
    # decode_tokens_per_s counts the tokens after the first, as generated_tokens - 1 over the decode time
    decode_s = sum((r["generated_tokens"] - 1) / r["decode_tokens_per_s"] for r in runs)
    stats["decode_tokens_per_s"] = sum(r["generated_tokens"] - 1 for r in runs) / decode_s
    stats["hit_rate"] = stats["cache_hits"] / max(1, stats["expert_uses"])
    weights = [r["generated_tokens"] for r in runs]  # every decode step scores one guess per layer
    for key in [k for k in stats if k.startswith("prefetch_recall")]:
        stats[key] = sum(r.get(key, 0.0) * w for r, w in zip(runs, weights)) / max(1, sum(weights))
    stats["requests"] = requests
    stats["per_request_tokens_per_s"] = [r["decode_tokens_per_s"] for r in runs]
    stats["per_request_bytes"] = [r["bytes_fetched"] for r in runs]
    stats["server"] = {k: v for k, v in c.stats().items() if not k.startswith("layer")}
    return stats, wall


def run(shape: ModelShape, templates: list[tuple[np.ndarray, ExpertManifest]], caps: list[float],
        prompt: list[int], args: Any, ctx_bytes: int, log: Callable[[str], None],
        over_budget: Callable[[float], bool], rows: list[dict[str, Any]], work: Path,
        inloop: Callable[[str], None] | None = None, dense: Any = None) -> None:
    """Starts the workers once, then one coordinator per (mode, cap); appends one row per run."""
    spec = spec_of(templates)
    t0 = time.perf_counter()
    # Scratch: caches of earlier runs (other bits or meta bits: 13-20 GB each at Mixtral's size) filled the GPU
    # machine's 64 GB disk after four runs on one lease (session 16).
    shutil.rmtree(work / "cache", ignore_errors=True)
    ckpt = write_checkpoint(work / "ckpt", shape, args.device, dense=dense)
    write_worker_caches(ckpt, work / "cache", spec, args.workers, templates)
    log(f"system: checkpoint + {args.workers} worker caches written in {time.perf_counter() - t0:.1f}s")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MOE_CACHE_DIR": str(work / "moe-cache")}
    if env.get("PYTORCH_CUDA_ALLOC_CONF") == IN_LOOP_ALLOC_CONF:  # the in-loop rows' own, not the user's: the
        del env["PYTORCH_CUDA_ALLOC_CONF"]  # servers set up their allocator as they do for a user (item 77)
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    workers = []
    try:
        for i in range(args.workers):
            workers.append(Proc(["expert_workers", "serve", "--model", str(ckpt), "--shard", f"{i}/{args.workers}",
                                 "--port", "0", "--expert-bits", str(spec.bits), "--group-size", str(spec.group_size),
                                 "--meta-bits", str(spec.meta_bits),
                                 "--cache-dir", str(work / "cache"), "--no-progress"],
                                work / f"worker{i}.log", env))
        addrs = ",".join(w.address for w in workers if w.address)
        log(f"system: {args.workers} workers serving at {addrs} ({time.perf_counter() - t0:.1f}s)")
        if args.profile_coordinator:
            try:
                profile_coordinator(ckpt, addrs, caps[0], prompt, args, log, rows, tokens=args.profile_tokens)
            except Exception as e:  # noqa: BLE001 - a diagnosis, not a run
                import traceback
                traceback.print_exc()
                log(f"coordinator profile failed: {e}")
        if getattr(args, "timeline", False):
            timelines(ckpt, addrs, caps, prompt, args, log, rows, spec.bits)
        if inloop is not None and args.system_runs in ("all", "inloop"):
            inloop(addrs)
        if args.offloading_eager and args.system_runs == "all":
            for cap in caps:
                offloading_eager(ckpt, addrs, cap, prompt, args, ctx_bytes, log, over_budget, rows,
                                 templates[0][1].nbytes, spec.bits)
        settings = prefetch_settings(args.sys_prefetch)
        plan = [] if args.system_runs in ("inloop", "profile") else [
            ("d_workers_shm_zero_copy" + ("" if i == 0 else suffix), cap, flags, args.new_tokens)
            for i, (suffix, flags) in enumerate(settings) for cap in caps]
        if args.grpc_tokens > 0 and args.system_runs == "all":
            plan.append(("e_workers_grpc_stream", caps[0], ["--no-zero-copy", *settings[0][1]], args.grpc_tokens))
        for name, cap, extra, n in plan:
            if over_budget(60 + n * args.sys_requests * (0.1 if name.startswith("e_") else 0.03)):
                rows.append({"variant": name, "bits": spec.bits, "cap_gb": cap, "skipped": "time budget"})
                log(f"SKIP {name} {cap}: time budget")
                continue
            # the cap is cap·1e9 bytes; the coordinator's --gpu-memory-gb takes GiB
            cmd = ["coordinator", "serve", "--model", str(ckpt), "--workers", addrs, "--port", "0", "--device", dev,
                   "--gpu-memory-gb", f"{cap * 1e9 / 2**30:.4f}", "--max-seq-len", "512", "--fetch-workers", "8",
                   *extra]
            t1 = time.perf_counter()
            try:
                coord = Proc(cmd, work / f"coord-{name}-{cap}.log", env)
            except RuntimeError as e:
                rows.append({"variant": name, "bits": spec.bits, "cap_gb": cap, "skipped": f"error: {e}"[:300]})
                log(f"{name} cap={cap} did not start:\n" + _tail(work / f"coord-{name}-{cap}.log"))
                continue
            try:
                up = time.perf_counter() - t1
                stats, wall = _run_requests(coord.address or "", prompt, args.warmup, n, args.sys_requests)
            except Exception as e:  # noqa: BLE001 - record the failure, keep the other runs
                rows.append({"variant": name, "bits": spec.bits, "cap_gb": cap, "skipped": f"error: {e}"[:300]})
                log(f"{name} cap={cap} failed: {e}\n" + _tail(coord.log.name))
                continue
            finally:
                coord.stop()
            gen = max(1, int(stats["generated_tokens"]) - args.sys_requests)
            tps = float(stats["decode_tokens_per_s"])
            server = stats.pop("server")
            # k: slots per layer, their mean when the budget spread them unevenly
            k = server["cache_slots"] / shape.layers
            row = {"variant": name, "bits": spec.bits, "cap_gb": cap, "k": k,
                   "tokens": gen, "graphs": False, "expert_bytes": templates[0][1].nbytes,
                   "ms_per_token": 1e3 / tps if tps else float("nan"), "tokens_per_s": tps,
                   "expert_uses": stats["expert_uses"], "cache_hits": stats["cache_hits"],
                   "cache_misses": stats["cache_misses"], "prefetch_issued": stats["prefetch_issued"],
                   "prefetch_used": stats["prefetch_used"], "bytes_fetched": stats["bytes_fetched"],
                   "prefetch_ahead_skipped": server.get("prefetch_ahead_skipped"),
                   "hit_rate": stats.get("hit_rate", 0.0), "prefetch_recall": stats.get("prefetch_recall"),
                   "bytes_per_token": stats["bytes_fetched"] / max(1, int(stats["generated_tokens"])),
                   # the device footprint: what the allocator held (blocks it cached included) + the context
                   "vram_peak_bytes": stats["gpu_peak_reserved_bytes"] + ctx_bytes,
                   "vram_peak_allocated_bytes": stats["gpu_peak_bytes"] + ctx_bytes,
                   "vram_note": "coordinator's torch.cuda.max_memory_reserved + CUDA context (allocated: "
                                "vram_peak_allocated_bytes)",
                   "coordinator_start_s": up, "client_wall_s": wall, "token_ids": [], "request_stats": stats}
            rows.append(row)
            log(f"{name:28s} bits={spec.bits} cap={cap} k={row['k']}: {tps:.2f} tok/s hit={row['hit_rate']:.3f} "
                f"recall={row['prefetch_recall']} MB/token={row['bytes_per_token'] / 1e6:.1f} "
                f"vram={row['vram_peak_bytes'] / 1e9:.2f} GB (allocated {row['vram_peak_allocated_bytes'] / 1e9:.2f}) "
                f"(coordinator up in {up:.0f}s)")
    except RuntimeError as e:
        log(f"system bench failed: {e}\n" + "\n".join(_tail(f) for f in sorted(work.glob("worker*.log"))))
        rows.append({"variant": "d/e", "bits": spec.bits, "cap_gb": None, "skipped": f"error: {e}"[:300]})
    finally:
        for w in workers:
            w.stop()


def prefetch_settings(spec: str) -> list[tuple[str, list[str]]]:
    """``--sys-prefetch`` items, "P", "P:A" (prefetch P experts per guess, guesses A layers ahead), each with
    optional trailing letters "n" (no speculative segments: ``--no-speculate``), "p" (no pipelined tokens:
    ``--no-pipeline``), "f" (slots fixed, evenly spread: ``--repartition-every 0``), "l" (LRU eviction:
    ``--eviction lru``), "a" (every miss admitted: ``--no-admission``) and "h" (4-bit lm_head: ``--lm-head-bits
    4``) and "s" (160 MiB allocator slack: ``--allocator-slack-mib 160``), as (row name suffix, coordinator
    flags); the first item is (d) itself."""
    letters_of = {"n": ("_nospec", ["--no-speculate"]), "p": ("_nopipe", ["--no-pipeline"]),
                  "f": ("_fixedslots", ["--repartition-every", "0"]), "l": ("_lru", ["--eviction", "lru"]),
                  "a": ("_no_admission", ["--no-admission"]), "h": ("_lm_head4", ["--lm-head-bits", "4"]),
                  "s": ("_slack160", ["--allocator-slack-mib", "160"])}
    out = []
    for item in str(spec).split(","):
        core = item.rstrip("".join(letters_of))
        p, _, a = core.partition(":")
        ahead = int(a or 1)
        name = f"_prefetch{int(p)}" + (f"_ahead{ahead}" if ahead > 1 else "")
        flags = ["--prefetch", str(int(p)), "--prefetch-ahead", str(ahead)]
        for letter, (suffix, extra) in letters_of.items():  # in this order, whatever the item's
            if letter in item[len(core):]:
                name, flags = name + suffix, flags + extra
        out.append((name, flags))
    return out


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
        rows.append({"variant": name, "bits": bits, "cap_gb": cap, "skipped": "time budget"})
        return
    src = RemoteSource(addrs.split(","))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() if cuda else 0
    co = Coordinator(ckpt, src, CoordinatorConfig(device="cuda" if cuda else "cpu", gpu_memory_gb=cap * 1e9 / 2**30,
                                                  max_seq_len=512, prefetch=0, fetch_workers=8, decode="transformers",
                                                  repartition_every=0, eviction="lru"))
    gen = torch.Generator().manual_seed(4321)
    stream = torch.randint(0, co.vocab_size, (args.warmup + n,), generator=gen).tolist()
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            kv = co.new_kv_cache()
            co.step(prompt, kv)
            _timed_steps(co, kv, stream[:args.warmup])
            before = co.runner.stats()
            ms = _timed_steps(co, kv, stream[args.warmup:])
            after = co.runner.stats()
        d = {k: after[k] - before[k] for k in ("expert_uses", "cache_hits", "cache_misses", "bytes_fetched")}
        k = sum(co.cache.layer_slots) / len(co.cache.layer_slots)
        row = {"variant": name, "bits": bits, "cap_gb": cap, "k": k, "tokens": n, "graphs": False,
               "expert_bytes": expert_bytes, "ms_per_token": ms, "tokens_per_s": 1e3 / ms, **d,
               "hit_rate": d["cache_hits"] / d["expert_uses"] if d["expert_uses"] else 0.0,
               "prefetch_recall": None, "bytes_per_token": d["bytes_fetched"] / n,
               "vram_peak_bytes": (torch.cuda.max_memory_allocated() - base if cuda else 0) + ctx_bytes,
               "vram_note": "peak allocated by this coordinator (above the bench loop's own) + CUDA context",
               "token_ids": []}
        rows.append(row)
        log(f"{name:28s} bits={bits} cap={cap} k={row['k']}: {row['tokens_per_s']:.2f} tok/s ({ms:.2f} ms/token) "
            f"hit={row['hit_rate']:.3f} MB/token={row['bytes_per_token'] / 1e6:.1f} "
            f"vram={row['vram_peak_bytes'] / 1e9:.2f} GB")
    except Exception as e:  # noqa: BLE001 - record the failure, keep the other runs
        rows.append({"variant": name, "bits": bits, "cap_gb": cap, "skipped": f"error: {e}"[:300]})
        log(f"{name} cap={cap} failed: {e}")
    finally:
        co.close()
        src.close()
        del co
        if cuda:
            torch.cuda.empty_cache()


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


def timelines(ckpt: Path, addrs: str, caps: list[float], prompt: list[int], args: Any,
              log: Callable[[str], None], rows: list[dict[str, Any]], bits: int) -> None:
    """``--timeline``: each cap and ``--sys-prefetch`` setting once under torch.profiler (``bench.timeline``),
    stored as rows the report prints apart."""
    from bench import timeline

    for cap in caps:
        for suffix, flags in prefetch_settings(args.sys_prefetch):
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


def _tail(path: Path | str, n: int = 25) -> str:
    try:
        return "".join(Path(path).read_text().splitlines(keepends=True)[-n:])
    except OSError:
        return ""
