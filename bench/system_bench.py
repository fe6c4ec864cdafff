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
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench import in_process, report
from bench.synth import ModelShape, spec_of
from deploy.server_process import ServerProcess
from expert_workers.format import ExpertManifest, QuantSpec, quant_fingerprint

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


Row = dict[str, Any]


def run(shape: ModelShape, templates: list[tuple[np.ndarray, ExpertManifest]], caps: list[float],
        prompt: list[int], args: Any, ctx_bytes: int, log: Callable[[str], None],
        over_budget: Callable[[float], bool], rows: list[Row], work: Path,
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
    env = _server_env(work)
    workers: list[ServerProcess] = []
    try:
        for i in range(args.workers):  # appended one by one: ``finally`` stops those that came up
            workers.append(ServerProcess.start(_worker_cmd(ckpt, spec, i, args.workers, work), env=env,
                                               timeout=300, log_path=work / f"worker{i}.log"))
        addrs = ",".join(w.address for w in workers if w.address)
        log(f"system: {args.workers} workers serving at {addrs} ({time.perf_counter() - t0:.1f}s)")
        _in_process_runs(ckpt, addrs, caps, prompt, args, ctx_bytes, log, over_budget, rows, templates, inloop)
        for name, cap, extra, n in coordinator_plan(args, caps):
            if over_budget(60 + n * args.sys_requests * (0.1 if name.startswith("e_") else 0.03)):
                rows.append(report.skipped(name, spec.bits, cap, "time budget"))
                log(f"SKIP {name} {cap}: time budget")
                continue
            cmd = _coordinator_cmd(ckpt, addrs, args.device, cap, extra)
            got = _coordinator_run(cmd, work / f"coord-{name}-{cap}.log", env, prompt, args, n, log)
            if isinstance(got, BaseException):
                rows.append(report.skipped(name, spec.bits, cap, got))
                continue
            rows.append(_row_of(got, name, spec.bits, cap, shape, templates[0][1].nbytes, ctx_bytes))
            log(_describe(rows[-1]))
    except (RuntimeError, TimeoutError) as e:
        log(f"system bench failed: {e}\n" + "\n".join(_tail(f) for f in sorted(work.glob("worker*.log"))))
        rows.append(report.skipped("d/e", spec.bits, None, e))
    finally:
        for w in workers:
            w.stop(timeout=8)


def _server_env(work: Path) -> dict[str, str]:
    """The servers' environment: this repo importable, their own model cache, the allocator as a user's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MOE_CACHE_DIR": str(work / "moe-cache")}
    if env.get("PYTORCH_CUDA_ALLOC_CONF") == IN_LOOP_ALLOC_CONF:  # the in-loop rows' own, not the user's: the
        del env["PYTORCH_CUDA_ALLOC_CONF"]  # servers set up their allocator as they do for a user (item 77)
    return env


def _worker_cmd(ckpt: Path, spec: QuantSpec, shard: int, shards: int, work: Path) -> list[str]:
    return ["expert_workers", "serve", "--model", str(ckpt), "--shard", f"{shard}/{shards}", "--port", "0",
            "--expert-bits", str(spec.bits), "--group-size", str(spec.group_size), "--meta-bits", str(spec.meta_bits),
            "--cache-dir", str(work / "cache"), "--no-progress"]


def _coordinator_cmd(ckpt: Path, addrs: str, device: str, cap: float, extra: list[str]) -> list[str]:
    # the cap is cap·1e9 bytes; the coordinator's --gpu-memory-gb takes GiB
    return ["coordinator", "serve", "--model", str(ckpt), "--workers", addrs, "--port", "0",
            "--device", "cuda" if device.startswith("cuda") else "cpu", "--gpu-memory-gb", f"{cap * 1e9 / 2**30:.4f}",
            "--max-seq-len", "512", "--fetch-workers", "8", *extra]


def _in_process_runs(ckpt: Path, addrs: str, caps: list[float], prompt: list[int], args: Any, ctx_bytes: int,
                     log: Callable[[str], None], over_budget: Callable[[float], bool], rows: list[Row],
                     templates: list[tuple[np.ndarray, ExpertManifest]],
                     inloop: Callable[[str], None] | None) -> None:
    """What runs in the bench's own process against the workers: the diagnoses asked for, the in-loop (p)
    rows, and (c) as mixtral-offloading builds it (``bench.in_process``)."""
    bits = spec_of(templates).bits
    if args.profile_coordinator:
        try:
            in_process.profile_coordinator(ckpt, addrs, caps[0], prompt, args, log, rows, tokens=args.profile_tokens)
        except Exception as e:  # noqa: BLE001 - a diagnosis, not a run
            import traceback
            traceback.print_exc()
            log(f"coordinator profile failed: {e}")
    if getattr(args, "timeline", False):
        in_process.timelines(ckpt, addrs, caps, prefetch_settings(args.sys_prefetch), prompt, args, log, rows, bits)
    if inloop is not None and args.system_runs in ("all", "inloop"):
        inloop(addrs)
    if args.offloading_eager and args.system_runs == "all":
        for cap in caps:
            in_process.offloading_eager(ckpt, addrs, cap, prompt, args, ctx_bytes, log, over_budget, rows,
                                        templates[0][1].nbytes, bits)


def coordinator_plan(args: Any, caps: list[float]) -> list[tuple[str, float, list[str], int]]:
    """The coordinator processes to run, as (row name, cap, extra flags, timed tokens): (d) for each
    ``--sys-prefetch`` setting and cap, then (e) at the first cap with the first setting."""
    if args.system_runs in ("inloop", "profile"):
        return []
    settings = prefetch_settings(args.sys_prefetch)
    plan = [("d_workers_shm_zero_copy" + ("" if i == 0 else suffix), cap, flags, args.new_tokens)
            for i, (suffix, flags) in enumerate(settings) for cap in caps]
    if args.grpc_tokens > 0 and args.system_runs == "all":
        plan.append(("e_workers_grpc_stream", caps[0], ["--no-zero-copy", *settings[0][1]], args.grpc_tokens))
    return plan


def _coordinator_run(cmd: list[str], log_path: Path, env: dict[str, str], prompt: list[int], args: Any, n: int,
                     log: Callable[[str], None]) -> Row | BaseException:
    """Starts one coordinator process, times its requests, stops it: {"stats", "wall", "up"}, or the exception
    (logged with the process's last lines) when it did not start or a request failed."""
    t1 = time.perf_counter()
    try:
        coord = ServerProcess.start(cmd, env=env, timeout=300, log_path=log_path)
    except (RuntimeError, TimeoutError) as e:
        log(f"{log_path.stem} did not start:\n" + _tail(log_path))
        return e
    try:
        up = time.perf_counter() - t1
        stats, wall = _run_requests(coord.address, prompt, args.warmup, n, args.sys_requests)
        return {"stats": stats, "wall": wall, "up": up}
    except Exception as e:  # noqa: BLE001 - record the failure, keep the other runs
        log(f"{log_path.stem} failed: {e}\n" + _tail(log_path))
        return e
    finally:
        coord.stop(timeout=8)


def _row_of(run: Row, name: str, bits: int, cap: float, shape: ModelShape, expert_bytes: int,
            ctx_bytes: int) -> Row:
    """A (d)/(e) row of the results from one coordinator's summed request stats."""
    stats, tokens = run["stats"], int(run["stats"]["generated_tokens"])
    tps = float(stats["decode_tokens_per_s"])
    server = stats.pop("server")
    return {"variant": name, "bits": bits, "cap_gb": cap,
            "k": server["cache_slots"] / shape.layers,  # slots per layer, their mean when the budget spread them
            "tokens": max(1, tokens - stats["requests"]), "graphs": False, "expert_bytes": expert_bytes,
            "ms_per_token": 1e3 / tps if tps else float("nan"), "tokens_per_s": tps,
            **{k: stats[k] for k in ("expert_uses", "cache_hits", "cache_misses", "prefetch_issued",
                                     "prefetch_used", "bytes_fetched")},
            "prefetch_ahead_skipped": server.get("prefetch_ahead_skipped"),
            "hit_rate": stats.get("hit_rate", 0.0), "prefetch_recall": stats.get("prefetch_recall"),
            "bytes_per_token": stats["bytes_fetched"] / max(1, tokens),
            # the device footprint: what the allocator held (blocks it cached included) + the context
            "vram_peak_bytes": stats["gpu_peak_reserved_bytes"] + ctx_bytes,
            "vram_peak_allocated_bytes": stats["gpu_peak_bytes"] + ctx_bytes,
            "vram_note": "coordinator's torch.cuda.max_memory_reserved + CUDA context (allocated: "
                         "vram_peak_allocated_bytes)",
            "coordinator_start_s": run["up"], "client_wall_s": run["wall"], "token_ids": [], "request_stats": stats}


def _describe(row: Row) -> str:
    return (f"{row['variant']:28s} bits={row['bits']} cap={row['cap_gb']} k={row['k']}: {row['tokens_per_s']:.2f} "
            f"tok/s hit={row['hit_rate']:.3f} recall={row['prefetch_recall']} "
            f"MB/token={row['bytes_per_token'] / 1e6:.1f} vram={row['vram_peak_bytes'] / 1e9:.2f} GB (allocated "
            f"{row['vram_peak_allocated_bytes'] / 1e9:.2f}) (coordinator up in {row['coordinator_start_s']:.0f}s)")


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


def _tail(path: Path | str, n: int = 25) -> str:
    try:
        return "".join(Path(path).read_text().splitlines(keepends=True)[-n:])
    except OSError:
        return ""
