"""Where a decode step's device time goes: compute and expert copies, from a torch.profiler chrome trace.

The coordinator overlaps expert copies (a side stream, host→device) with compute (the default stream). Three
different bottlenecks look the same in tokens/s, and each has its own fix:

- *copy-bound*: the copy engine runs while compute waits for it ("copy only");
- *guess-bound*: compute runs while the copy engine has nothing queued ("compute only"): copies could have
  started earlier, had the guesses been made further ahead;
- *host-bound*: neither runs ("idle"): the GPU waits for the host between two graph replays.

``breakdown`` splits the profiled window into these parts from the trace's device events alone (kernels,
``gpu_memcpy`` host→device), so it reads traces from any torch that writes chrome traces.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Interval = tuple[float, float]
"""(start, end) in µs, as chrome traces give them."""

EXPERT_COPY_MIN_BYTES = 1 << 20
"""Host→device copies at least this large are expert copies; the smaller ones are routing tables."""


@dataclass(frozen=True)
class DeviceTrace:
    """The device events of one profiled window."""

    kernels: tuple[Interval, ...]
    """Every kernel, any stream."""
    copies: tuple[Interval, ...]
    """Host→device expert copies."""
    copy_bytes: int
    """Bytes those copies moved."""


TOKEN_MARK = "decode_token"
"""Name of the zero-length host range ``profile_decode`` records as each token is emitted."""


def marks(trace: dict[str, Any], name: str = TOKEN_MARK) -> list[float]:
    """Start times (µs) of the host ranges called ``name``, sorted."""
    return sorted(float(ev["ts"]) for ev in trace.get("traceEvents", []) if ev.get("name") == name and "ts" in ev)


def device_trace(trace: dict[str, Any], window: Interval | None = None) -> DeviceTrace:
    """Kernels and expert copies of a chrome trace (``torch.profiler.profile.export_chrome_trace``), clipped to
    ``window`` when given (device and host times share one clock in these traces)."""
    kernels: list[Interval] = []
    copies: list[Interval] = []
    nbytes = 0
    lo, hi = window if window is not None else (float("-inf"), float("inf"))
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or "dur" not in ev:
            continue
        span = (max(lo, float(ev["ts"])), min(hi, float(ev["ts"]) + float(ev["dur"])))
        if span[0] >= span[1]:
            continue
        cat = str(ev.get("cat", "")).lower()
        if cat == "kernel":
            kernels.append(span)
        elif cat == "gpu_memcpy" and "htod" in str(ev.get("name", "")).lower():
            size = int((ev.get("args") or {}).get("bytes", 0))
            if size >= EXPERT_COPY_MIN_BYTES:
                copies.append(span)
                nbytes += size
    return DeviceTrace(tuple(kernels), tuple(copies), nbytes)


def union(spans: Iterable[Interval]) -> list[Interval]:
    """Sorted, non-overlapping cover of ``spans``."""
    out: list[Interval] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _length(spans: Sequence[Interval]) -> float:
    return sum(end - start for start, end in spans)


def _intersect(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    """Intersection of two unions (each sorted, non-overlapping)."""
    out: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def breakdown(dt: DeviceTrace, tokens: int) -> dict[str, float]:
    """Per token (ms): wall, compute and copy busy, and the four-way split of the wall (both / compute only /
    copy only / idle); the copies' count and GB/s while they ran."""
    compute, copy = union(dt.kernels), union(dt.copies)
    every = union([*compute, *copy])
    if not every:
        return {"tokens": float(tokens)}
    wall = every[-1][1] - every[0][0]
    both = _length(_intersect(compute, copy))
    busy_compute, busy_copy = _length(compute), _length(copy)
    per = 1e-3 / max(1, tokens)  # µs in the window → ms per token
    return {
        "tokens": float(tokens),
        "wall_ms": wall * per,
        "compute_ms": busy_compute * per,
        "copy_ms": busy_copy * per,
        "both_ms": both * per,
        "compute_only_ms": (busy_compute - both) * per,
        "copy_only_ms": (busy_copy - both) * per,
        "idle_ms": (wall - _length(every)) * per,
        "copies_per_token": len(dt.copies) / max(1, tokens),
        "copy_gb_s": dt.copy_bytes / max(busy_copy, 1e-9) * 1e-3,
    }


def table(parts: dict[str, float], label: str = "") -> str:
    """The breakdown as a small markdown table."""
    keys = ("wall_ms", "compute_ms", "copy_ms", "both_ms", "compute_only_ms", "copy_only_ms", "idle_ms",
            "copies_per_token", "copy_gb_s")
    head = f"| {label or 'timeline'} | " + " | ".join(keys) + " |"
    sep = "|---" * (len(keys) + 1) + "|"
    vals = "| per token | " + " | ".join(f"{parts.get(k, float('nan')):.2f}" for k in keys) + " |"
    return "\n".join((head, sep, vals))


def profile_decode(ckpt: Path, addrs: str, cap_gb: float, flags: Sequence[str], prompt: Sequence[int],
                   tokens: int, out: Path, log: Callable[[str], None], device: str = "cuda",
                   bits: int = 2) -> dict[str, Any]:
    """One coordinator in this process, configured by coordinator ``serve`` flags (as a (d) row), with its
    warm-up request first; then one request under torch.profiler. Its chrome trace (gzipped) goes to ``out``;
    returns the breakdown over the decode tokens (between the first and the last token emitted)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from coordinator.__main__ import engine_config, parse_args
    from coordinator.engine import Coordinator
    from coordinator.generate import GenerateParams
    from expert_workers.fetch import RemoteSource

    args = parse_args(["serve", "--model", str(ckpt), "--workers", addrs, "--device", device, "--gpu-memory-gb",
                       f"{cap_gb * 1e9 / 2**30:.4f}", "--max-seq-len", "512", "--fetch-workers", "8", *flags])
    src = RemoteSource(addrs.split(","))
    co = Coordinator(ckpt, src, engine_config(args))
    try:
        params = GenerateParams(prompt_token_ids=tuple(prompt), max_new_tokens=tokens, temperature=1.0, seed=1)
        warm = co.generate(params)[-1].stats  # graphs captured, the cache filled
        cuda = torch.device(device).type == "cuda"

        def emit(_event: object) -> None:
            with record_function(TOKEN_MARK):
                pass

        with profile(activities=[ProfilerActivity.CPU, *[ProfilerActivity.CUDA] * cuda]) as prof:
            co.run(params, co.prepare(params), emit)
            if cuda:
                torch.cuda.synchronize()
        path = out / f"trace-{bits}bit-{cap_gb:g}gb{'_'.join(['', *flags]).replace('--', '')}.json"
        prof.export_chrome_trace(str(path))
        raw = path.read_bytes()  # read once: parsed here, kept gzipped
        trace = json.loads(raw)
        gz = path.with_suffix(".json.gz")
        gz.write_bytes(gzip.compress(raw))
        path.unlink()
    finally:
        co.close()
        src.close()
    at = marks(trace)
    parts = breakdown(device_trace(trace, (at[0], at[-1])), len(at) - 1) if len(at) > 2 else {}
    log(f"timeline, {bits}-bit experts at {cap_gb:g} GB {' '.join(flags)} (warm request "
        f"{warm.get('decode_tokens_per_s', 0):.1f} tok/s):\n" + table(parts, f"{cap_gb:g} GB"))
    return {"cap_gb": cap_gb, "flags": list(flags), "trace": gz.name, "warm_tokens_per_s":
            warm.get("decode_tokens_per_s"), "timeline": parts}
