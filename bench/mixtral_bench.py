"""Mixtral-8x7B-shaped decode benchmark under a VRAM cap, side by side (issue 6). One GPU call:

    PYTHONPATH=.gpu/site:. python -m bench.mixtral_bench --out $OUT

(a) all experts resident · (b) naive offload (pageable, copy on use) · (c) per-layer LRU + pinned memory,
mixtral-offloading style · (p) in-process LRU + pinned + side-stream speculative prefetch (reference for
our data path) · (d)/(e) ours through real expert-worker processes: bench/system_bench.py.
Every variant runs the same prompt through the same kernels (coordinator.gpu_kernels) and the same
CUDA-graphed decode segments (bench/model.py); only where experts live and how they move differs.
Inputs are teacher-forced from a random token stream (a random model's greedy output loops on one token);
the measured hit rates, not k/8, are what the transfer floor uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench import report
from bench.backends import LRU, Naive, Prefetch, Resident, WorkerShm
from bench.model import DecodeModel
from bench.synth import MIXTRAL_8X7B, SMALL, TINY, ExpertBank, ModelShape, build_bank, build_dense, expert_templates
from coordinator import gpu_kernels as gk
from expert_workers.format import INT2, INT3, META_BITS

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_bw(nbytes: int, device: str, copies: int = 8) -> dict[str, float]:
    """H2D GB/s for expert-sized copies from pinned and from pageable memory (distinct sources)."""
    out = {}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for kind in ("pinned", "pageable"):
        src = torch.ones((copies, nbytes), dtype=torch.uint8, pin_memory=(kind == "pinned"))
        for i in range(2):
            dst.copy_(src[i], non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(copies):
            dst.copy_(src[i], non_blocking=True)
        torch.cuda.synchronize()
        out[f"h2d_{kind}_GBps"] = copies * nbytes / (time.perf_counter() - t0) / 1e9
        del src
    return out


def host_cpu() -> str:
    """The host's processor and core count: (c)'s eager forward is bound by the host's Python, so its speed
    varies from lease to lease with the CPU (NOTES items 84 and 87)."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def env_info(device: str) -> dict[str, Any]:
    import importlib.metadata as md
    import platform
    import subprocess

    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.version.cuda, "argv": sys.argv,
                            "host_cpu": host_cpu()}
    for pkg in ("triton", "transformers", "hqq", "gemlite", "grpcio", "protobuf", "msgpack", "xxhash"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            mod = sys.modules.get(pkg) or __import__(pkg)
            info[pkg] = getattr(mod, "__version__", "present (no dist metadata)")
        except Exception as e:  # noqa: BLE001 - report, don't fail
            info[pkg] = f"missing ({type(e).__name__})"
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        free, total = torch.cuda.mem_get_info()
        info["gpu_total_bytes"] = total
        info["cuda_context_bytes"] = total - free - torch.cuda.memory_reserved()
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def self_check(tpl2: list[Any], tpl3: list[Any] | None, dev: str) -> None:
    """Fail fast (seconds into the call) if a kernel disagrees with hqq at full size."""
    from bench.kernel_bench import reference, rel

    for tpl in [t for t in (tpl2, tpl3) if t]:
        buf, man = torch.from_numpy(tpl[0][0]).to(dev), tpl[0][1]
        x = torch.randn(1, man.matrices["w1"].shape[1], device=dev, dtype=torch.bfloat16)
        err = rel(gk.expert_ffn(x, buf, man), reference(x, buf, man))
        log(f"self-check {man.matrices['w1'].bits}-bit expert_ffn rel err {err:.2e}")
        if not err < 1e-2:
            raise SystemExit(f"kernel self-check failed: rel err {err}")


class Runner:
    """Runs variants on one model under a time budget and collects their rows."""

    def __init__(self, model: DecodeModel, args: argparse.Namespace, prompt: list[int], ctx_bytes: int) -> None:
        self.m, self.a, self.prompt, self.ctx = model, args, prompt, ctx_bytes
        self.rows: list[dict[str, Any]] = []
        self.cuda = args.device.startswith("cuda")

    def over_budget(self, est_s: float = 0.0) -> bool:
        return time.perf_counter() - T0 + est_s > self.a.budget_s

    def run(self, label: str, make: Callable[[], Any], bits: int, cap: float | None, k: int | None,
            n_tokens: int, graphs: bool, est_s: float = 10.0) -> dict[str, Any] | None:
        if self.over_budget(est_s):
            log(f"SKIP {label}: time budget")
            self.rows.append(report.skipped(label, bits, cap, "time budget"))
            return None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        be = make()
        self.m.set_backend(be, graphs and self.cuda)
        self.m.reset(self.prompt)
        for _ in range(self.a.warmup):
            self.m.decode_token()
        be.reset()
        sync(self.a.device)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            self.m.decode_token()
        sync(self.a.device)
        dt = time.perf_counter() - t0
        st = be.stats()
        row: dict[str, Any] = {
            "variant": label, "bits": bits, "cap_gb": cap, "k": k, "tokens": n_tokens, "graphs": graphs and self.cuda,
            "expert_bytes": self.m.layout.nbytes,
            "ms_per_token": dt * 1e3 / n_tokens, "tokens_per_s": n_tokens / dt, **st,
            "bytes_per_token": st["bytes_fetched"] / n_tokens,
            "token_ids": self.m.out_tokens[: self.a.warmup + n_tokens].tolist()}
        if self.cuda:
            row["vram_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            row["vram_peak_bytes"] = row["vram_peak_reserved_bytes"] + self.ctx
        log(f"{label:28s} bits={bits} cap={cap} k={k}: {row['tokens_per_s']:.2f} tok/s "
            f"({row['ms_per_token']:.2f} ms/token) hit={st['hit_rate']:.3f} "
            f"MB/token={row['bytes_per_token'] / 1e6:.1f} vram={row.get('vram_peak_bytes', 0) / 1e9:.2f} GB")
        self.m.graphs = None
        self.m.backend = None
        del be
        self.rows.append(row)
        return row


def k_for_cap(cap_gb: float, base_bytes: int, ctx_bytes: int, reserve_bytes: int, bank: ExpertBank,
              shape: ModelShape) -> int:
    """Experts per layer that fit: (cap − CUDA context − resident model − working reserve) / (L · slot)."""
    free = cap_gb * 1e9 - ctx_bytes - base_bytes - reserve_bytes
    return max(0, min(shape.experts, int(free // (shape.layers * bank.slot_bytes))))


def bench_bits(r: Runner, shape: ModelShape, bits: int, caps: list[float], tpl: list[Any], base_bytes: int,
               bw: dict[str, float], naive_tokens: int, variants: set[str]) -> None:
    a, dev, L, E = r.a, r.a.device, shape.layers, shape.experts
    r.m.layout = gk.layout_of(tpl[0][1])
    graphs = r.m.layout.fused    # the 3-bit fallback syncs on slots (dequantize per slot): eager only
    pinned = build_bank(shape, tpl, pinned=r.cuda)
    log(f"{bits}-bit bank: {L * E} experts × {pinned.expert_bytes / 1e6:.1f} MB (slot {pinned.slot_bytes})")
    if "a" in variants:
        if r.cuda and a.eager_a:
            r.run("a_resident_eager", lambda: Resident(pinned, dev), bits, None, E, a.new_tokens, graphs=False)
        r.run("a_resident", lambda: Resident(pinned, dev), bits, None, E, a.new_tokens, graphs=graphs)
    if "b" in variants:
        pageable = build_bank(shape, tpl, pinned=False)
        est = (a.prompt_len + a.warmup + naive_tokens) * L * 2 * pinned.expert_bytes / (bw.get("h2d_pageable_GBps", 5) * 1e9)
        r.run("b_naive_pageable", lambda: Naive(pageable, dev, shape.top_k, E), bits, None, 0, naive_tokens,
              graphs=graphs, est_s=est)
        del pageable
        gc.collect()
    for cap in caps:
        k = k_for_cap(cap, base_bytes, r.ctx, int(a.reserve_gb * 1e9), pinned, shape)
        log(f"cap {cap} GB → k = {k} experts per layer")
        if k < shape.top_k:
            r.rows.append(report.skipped("c/p", bits, cap, f"k={k} < top_k"))
            continue
        if "c" in variants:
            r.run("c_lru_pinned", lambda: LRU(pinned, dev, k, L, E), bits, cap, k, a.new_tokens, graphs=graphs)
        if "p" in variants and r.cuda:
            r.run("p_lru_prefetch_inproc", lambda: Prefetch(pinned, dev, k, L, E, guesses=a.guesses), bits, cap, k,
                  a.new_tokens, graphs=graphs)
    del pinned
    gc.collect()


def inloop_workers(r: Runner, shape: ModelShape, caps: list[float], tpl: list[Any], base_bytes: int,
                   addrs: str) -> None:
    """Our data path in the benchmark's own decode loop, fed by the real worker processes' shared memory."""
    from expert_workers.fetch import RemoteSource

    a, L, E = r.a, shape.layers, shape.experts
    if not r.cuda:
        return
    r.m.layout = gk.layout_of(tpl[0][1])
    slot = (tpl[0][1].nbytes + 4095) // 4096 * 4096
    bank = ExpertBank(host=torch.empty((0, slot), dtype=torch.uint8, pin_memory=True), manifests=[tpl[0][1]],
                      spec=INT2)
    src = RemoteSource(addrs.split(","))
    try:
        for cap in caps:
            k = k_for_cap(cap, base_bytes, r.ctx, int(a.reserve_gb * 1e9), bank, shape)
            for g, label in ((a.guesses, "d_inloop_workers_shm"), (0, "d_inloop_workers_shm_noprefetch")):
                r.run(label, lambda: WorkerShm(src, bank, a.device, k, L, E, guesses=g), 2, cap, k, a.new_tokens,
                      graphs=True)
    except Exception as e:  # noqa: BLE001 - keep the coordinator runs
        import traceback
        traceback.print_exc()
        r.rows.append(report.skipped("d_inloop_workers_shm", 2, None, e))
    finally:
        from coordinator.pinning import PROCESS_REGISTRY
        torch.cuda.synchronize()
        PROCESS_REGISTRY.release(id(src))  # unregister before the mappings go away
        src.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("mixtral", "small", "tiny"), default="mixtral")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--caps", default="16,12,8", help="GPU memory caps (GB = 1e9 bytes) for 2-bit experts")
    ap.add_argument("--caps3", default="12", help="caps for 3-bit experts ('' to skip)")
    ap.add_argument("--variants", default="a,b,c,p")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--naive-tokens", type=int, default=128)
    ap.add_argument("--naive3-tokens", type=int, default=32)
    ap.add_argument("--guesses", type=int, default=2, help="next-layer experts prefetched per layer")
    ap.add_argument("--templates", type=int, default=4)
    ap.add_argument("--meta-bits", type=int, default=16, choices=META_BITS,
                    help="every row's experts with scales and zeros as 16-bit values or 8-bit table codes [16]")
    ap.add_argument("--reserve-gb", type=float, default=0.9,
                    help="activations, graph pools, allocator slack, prefetch spares (0.6 let the 8 GB in-loop rows "
                         "peak at 8.2 GB in results/2026-11-30-h200-s4b)")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--kernels3", action=argparse.BooleanOptionalAction, default=True,
                    help="with --no-kernels and --caps3: still time and tune the 3-bit GEMV (kernel_bench.run3)")
    ap.add_argument("--shm-probe", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--eager-a", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--system", action=argparse.BooleanOptionalAction, default=True,
                    help="(d)/(e): real worker processes + coordinator process (bench/system_bench.py)")
    ap.add_argument("--workers", type=int, default=2, help="expert worker processes for (d)/(e)")
    ap.add_argument("--grpc-tokens", type=int, default=24, help="tokens for (e) (each miss ~0.1 s over gRPC)")
    ap.add_argument("--sys-prefetch", default="2",
                    help="coordinator prefetch for (d), comma-separated P or P:A (A = --prefetch-ahead), each with "
                         "optional letters n (--no-speculate), p (--no-pipeline), f (--repartition-every 0), l "
                         "(--eviction lru), a (--no-admission), h (--lm-head-bits 4): the first is (d), the others "
                         "extra rows")
    ap.add_argument("--sys-requests", type=int, default=4,
                    help="timed requests per (d)/(e) row, each --new-tokens long with its own seed; counters summed")
    ap.add_argument("--offloading-eager", action=argparse.BooleanOptionalAction, default=True,
                    help="(c) mixtral-offloading style: transformers' eager forward + LRU + pinned, in-process")
    ap.add_argument("--bits2", action=argparse.BooleanOptionalAction, default=True,
                    help="2-bit variants in the bench loop (a, b, c, p)")
    ap.add_argument("--system-runs", choices=("all", "inloop", "coordinator", "profile"), default="all",
                    help="inloop: only our loop fed by the worker processes (no coordinator processes); coordinator: "
                         "only the coordinator processes ((d), (e)); profile: only --profile-coordinator")
    ap.add_argument("--system3", action=argparse.BooleanOptionalAction, default=False,
                    help="also run (d)/(e) with 3-bit workers")
    ap.add_argument("--profile-coordinator", action=argparse.BooleanOptionalAction, default=False,
                    help="cProfile the coordinator's decode step in-process (diagnosis)")
    ap.add_argument("--profile-tokens", type=int, default=24,
                    help="--profile-coordinator: tokens per phase (half warm-up, half timed; as many under cProfile)")
    ap.add_argument("--timeline", action=argparse.BooleanOptionalAction, default=False,
                    help="each (d) cap and --sys-prefetch setting once in-process under torch.profiler: where the "
                         "device time goes (compute, copies, both, idle); chrome traces into --out")
    ap.add_argument("--timeline-tokens", type=int, default=24, help="--timeline: tokens per profiled request")
    ap.add_argument("--work", default="/tmp/moe-bench", help="scratch dir: checkpoint, worker caches, logs")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="h200")
    return ap.parse_args(argv)


def probes(a: argparse.Namespace, shape: ModelShape, tpl2: list, tpl3: list | None, dev: str,
           results: dict[str, Any], save: Callable[[], None]) -> None:
    """What the GPU runs before the decode rows: the kernels' self-check, H2D bandwidth, the shared-memory
    probe and the kernel timings (each optional)."""
    if not dev.startswith("cuda"):
        return
    self_check(tpl2, tpl3, dev)
    results["bandwidth"] = measure_bw(tpl2[0][1].nbytes, dev)
    log(f"bandwidth: {results['bandwidth']}")
    if a.shm_probe:
        from bench import shm_probe
        try:
            results["shm_probe"] = shm_probe.probe()
        except Exception as e:  # noqa: BLE001 - a probe, not a run
            results["shm_probe"] = {"error": f"{type(e).__name__}: {e}"}
        log(f"shm probe: {results['shm_probe']}")
    if a.kernels:
        from bench import kernel_bench
        try:
            results["kernels"] = kernel_bench.run(shape, tpl2, tpl3, dev, log)
        except Exception as e:  # keep the system runs even if one kernel check breaks
            import traceback
            traceback.print_exc()
            results["kernels"] = {"error": f"{type(e).__name__}: {e}"}
        save()
    elif a.kernels3 and tpl3:
        from bench import kernel_bench
        results["kernels3"] = kernel_bench.run3(shape, tpl3, dev, log)
        save()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    shape = {"mixtral": MIXTRAL_8X7B, "small": SMALL, "tiny": TINY}[a.shape]
    dev = a.device
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"env": env_info(dev), "shape": shape.__dict__, "args": vars(a)}
    log(f"env: {json.dumps(results['env'])}")

    def save() -> None:
        path = out / f"{time.strftime('%Y-%m-%d')}-{a.tag}.json"
        path.write_text(json.dumps(results, indent=1, default=str))
        (out / f"{time.strftime('%Y-%m-%d')}-{a.tag}.md").write_text(report.markdown(results))

    tpl2 = expert_templates(shape, dataclasses.replace(INT2, meta_bits=a.meta_bits), a.templates, dev)
    caps3 = [float(c) for c in a.caps3.split(",") if c]
    tpl3 = expert_templates(shape, dataclasses.replace(INT3, meta_bits=a.meta_bits), 2, dev, seed=10) \
        if caps3 else None
    log("templates quantized")
    probes(a, shape, tpl2, tpl3, dev, results, save)
    dense = build_dense(shape, dev)
    model = DecodeModel(shape, dense, gk.layout_of(tpl2[0][1]), dev)
    sync(dev)
    base = torch.cuda.memory_allocated() if dev.startswith("cuda") else 0
    results["resident_model_bytes"] = base
    ctx = int(results["env"].get("cuda_context_bytes", 0))
    gen = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, shape.vocab, (a.prompt_len,), generator=gen).tolist()
    results["prompt"] = prompt
    runner = Runner(model, a, prompt, ctx)
    results["runs"] = runner.rows
    bw = results.get("bandwidth", {})
    variants = set(a.variants.split(","))
    caps2 = [float(c) for c in a.caps.split(",") if c]
    try:
        if a.bits2:
            bench_bits(runner, shape, 2, caps2, tpl2, base, bw, a.naive_tokens, variants - {"b"})
            save()
        if a.system and caps2:
            from bench import system_bench
            gc.collect()
            system_bench.run(shape, tpl2, caps2, prompt, a, ctx, log, runner.over_budget, runner.rows, Path(a.work),
                             inloop=lambda addrs: inloop_workers(runner, shape, caps2, tpl2, base, addrs), dense=dense)
            save()
        if "b" in variants and a.bits2:
            bench_bits(runner, shape, 2, [], tpl2, base, bw, a.naive_tokens, {"b"})
            save()
        if tpl3:
            bench_bits(runner, shape, 3, caps3, tpl3, base, bw, a.naive3_tokens, variants)
            save()
            if a.system and a.system3:
                from bench import system_bench
                gc.collect()
                system_bench.run(shape, tpl3, caps3, prompt, a, ctx, log, runner.over_budget, runner.rows,
                                 Path(a.work) / "bits3", dense=dense)
    finally:
        report.finish(results)
        save()
        print(report.table(results), flush=True)
    return 0


if __name__ == "__main__":
    from bench.system_bench import IN_LOOP_ALLOC_CONF

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", IN_LOOP_ALLOC_CONF)
    sys.exit(main())
