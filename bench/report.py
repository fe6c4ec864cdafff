"""Derived numbers (transfer floor, ratios, token agreement) and the printed / markdown tables."""

from __future__ import annotations

import math
from typing import Any

OURS = ("d_", "e_", "p_")


def skipped(variant: str, bits: int, cap: float | None, why: str | BaseException) -> dict[str, Any]:
    """The row of a run that did not happen. Its reason is one line, a cell of the markdown table; for a
    failure, "error: " and the message's last line, which says why (a server's startup error ends with its own
    last line of output; the whole of it is in the server's log)."""
    if isinstance(why, BaseException):
        lines = [ln.strip() for ln in str(why).splitlines() if ln.strip()] or [type(why).__name__]
        why = "error: " + ("... " if len(lines) > 1 else "") + lines[-1].removeprefix("error: ")[-280:]
    return {"variant": variant, "bits": bits, "cap_gb": cap, "skipped": why[:300]}


def _a_row(rows: list[dict[str, Any]], bits: int) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("variant") == "a_resident" and r.get("bits") == bits
                 and "skipped" not in r), None)


def finish(results: dict[str, Any]) -> None:
    """Adds floor_ms (time of (a) + the misses' transfer time at the measured pinned H2D bandwidth),
    floor_bytes_ms (same with every byte moved, wasted prefetches included), token agreement with (a), and
    the ratio rows."""
    rows: list[dict[str, Any]] = results.get("runs", [])
    bw = results.get("bandwidth", {}).get("h2d_pinned_GBps")
    for r in rows:
        if "skipped" in r:
            continue
        a = _a_row(rows, r["bits"])
        if a is not None and r is not a:
            n = min(len(a["token_ids"]), len(r["token_ids"]))
            same = sum(x == y for x, y in zip(a["token_ids"][:n], r["token_ids"][:n]))
            r["tokens_match_a"] = same / n if n else None
        if a is not None and bw:
            uses = r["expert_uses"] / r["tokens"] if r["expert_uses"] else 0.0
            miss_bytes = uses * (1 - r["hit_rate"]) * r["expert_bytes"]
            r["floor_ms"] = a["ms_per_token"] + miss_bytes / (bw * 1e9) * 1e3
            r["floor_bytes_ms"] = a["ms_per_token"] + r["bytes_per_token"] / (bw * 1e9) * 1e3
            r["floor_over_ms"] = r["floor_ms"] / r["ms_per_token"]
    ratios = []
    for r in rows:
        if "skipped" in r or not r["variant"].startswith(OURS) or r.get("cap_gb") is None:
            continue
        b = next((x for x in rows if x["variant"].startswith("b_") and x["bits"] == r["bits"] and "skipped" not in x),
                 None)
        c = _c_row(rows, r, "c_offloading_eager")    # (c): mixtral-offloading's design
        cg = _c_row(rows, r, "c_lru_pinned")         # (c'): the same LRU in our graphed loop (an ablation)
        ratios.append({"variant": r["variant"] + (f" [{r['run']}]" if r.get("run") else ""), "bits": r["bits"],
                       "cap_gb": r["cap_gb"], "k": r.get("k"), "c_k": c and c.get("k"), "cg_k": cg and cg.get("k"),
                       "tokens_per_s": r["tokens_per_s"],
                       "x_over_b": b and b["ms_per_token"] / r["ms_per_token"],
                       "x_over_c": c and c["ms_per_token"] / r["ms_per_token"],
                       "x_over_c_graphs": cg and cg["ms_per_token"] / r["ms_per_token"],
                       "x_over_floor": r.get("floor_over_ms"),
                       "x_over_bytes_floor": r.get("floor_bytes_ms") and r["floor_bytes_ms"] / r["ms_per_token"],
                       "vram_ok": r.get("vram_peak_bytes", 0) <= r["cap_gb"] * 1e9})
    results["ratios"] = ratios


def _k(k: float | None) -> str:
    """Slots per layer: whole, or their mean with one decimal when the budget spread them unevenly."""
    return _f(k, ".0f" if k is None or float(k).is_integer() else ".1f")


def _c_row(rows: list[dict[str, Any]], r: dict[str, Any], variant: str) -> dict[str, Any] | None:
    """The ``variant`` run at r's bits and cap, the one with r's k when there are several."""
    cs = [x for x in rows if x["variant"] == variant and x["bits"] == r["bits"] and x.get("cap_gb") == r["cap_gb"]
          and "skipped" not in x]
    return next((x for x in cs if x.get("k") == r.get("k")), cs[0] if cs else None)


def _f(v: Any, fmt: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _lines(results: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    head = ["variant", "bits", "cap GB", "k", "tok/s", "ms/tok", "hit", "recall", "MB/tok", "VRAM GB",
            "floor tok/s", "x/floor", "argmax = (a)"]
    body = []
    for r in results.get("runs", []):
        if "skipped" in r:
            body.append([r["variant"] + (f" [{r['run']}]" if r.get("run") else ""), str(r["bits"]),
                         _f(r.get("cap_gb"), ".0f"), "-", "skipped: " + r["skipped"]]
                        + [""] * (len(head) - 5))
            continue
        name = r["variant"] + (f" [{r['run']}]" if r.get("run") else "")
        body.append([name, str(r["bits"]), _f(r.get("cap_gb"), ".0f"), _k(r["k"]), _f(r["tokens_per_s"]),
                     _f(r["ms_per_token"]), _f(r["hit_rate"], ".3f"), _f(r.get("prefetch_recall"), ".3f"),
                     _f(r["bytes_per_token"] / 1e6, ".1f"), _f(r.get("vram_peak_bytes", 0) / 1e9),
                     _f(1e3 / r["floor_ms"] if r.get("floor_ms") else None), _f(r.get("floor_over_ms")),
                     _f(r.get("tokens_match_a"), ".3f")])
    # x/bytes floor: against (a) + every byte moved at the H2D bandwidth, no overlap; above 1 means copies
    # overlapped compute (the floor of the issue counts a prefetched expert as free instead)
    rhead = ["ours", "bits", "cap GB", "k", "tok/s", "x/(b)", "x/(c) [c's k]", "x/(c' graphs) [k]", "x/floor",
             "x/bytes floor", "VRAM ≤ cap"]
    rbody = [[q["variant"], str(q["bits"]), _f(q["cap_gb"], ".0f"), _k(q.get("k")), _f(q["tokens_per_s"]),
              _f(q["x_over_b"], ".1f"), f"{_f(q['x_over_c'])} [{_k(q.get('c_k'))}]",
              f"{_f(q.get('x_over_c_graphs'))} [{_k(q.get('cg_k'))}]", _f(q["x_over_floor"]),
              _f(q.get("x_over_bytes_floor")), _f(q["vram_ok"])] for q in results.get("ratios", [])]
    return head, body, rhead, rbody


def _timelines(results: dict[str, Any]) -> list[str]:
    """Markdown rows of the --timeline diagnoses (bench.timeline): ms per token of each part."""
    keys = ("wall_ms", "compute_ms", "copy_ms", "both_ms", "compute_only_ms", "copy_only_ms", "idle_ms",
            "copies_per_token", "copy_gb_s")
    rows = [r for r in results.get("runs", []) if r.get("timeline")]
    if not rows:
        return []
    out = ["| timeline | bits | cap GB | warm tok/s | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 4)]
    out += [f"| {r['variant']} | {r['bits']} | {_f(r['cap_gb'], '.0f')} | {_f(r.get('warm_tokens_per_s'))} | "
            + " | ".join(_f(r["timeline"].get(k)) for k in keys) + " |" for r in rows]
    return out


def table(results: dict[str, Any]) -> str:
    """Plain-text tables: every run, then the ratios last (the timelines, when there are any, before them)."""
    head, body, rhead, rbody = _lines(results)
    out = _timelines(results)
    k = results.get("kernels", {}).get("ms")
    if k:
        out.append("kernel ms (one expert, batch 1): " + ", ".join(f"{n}={v:.4f}" for n, v in k.items()))
    for h, b in ((head, body), (rhead, rbody)):
        w = [max(len(str(x)) for x in col) for col in zip(h, *b)] if b else [len(x) for x in h]
        out.append("  ".join(x.ljust(n) for x, n in zip(h, w)))
        out += ["  ".join(str(x).ljust(n) for x, n in zip(row, w)) for row in b]
        out.append("")
    return "\n".join(out)


def markdown(results: dict[str, Any]) -> str:
    env = results.get("env", {})
    head, body, rhead, rbody = _lines(results)
    md = ["# Mixtral-8x7B-shaped decode benchmark", "",
          f"- date: {env.get('date')}; GPU: {env.get('gpu')} (driver {env.get('driver')}); torch {env.get('torch')} "
          f"(CUDA {env.get('cuda')}); triton {env.get('triton')}; transformers {env.get('transformers')}; "
          f"host CPU {env.get('host_cpu', 'not recorded')}",
          f"- command: `{' '.join(env.get('argv', []))}`",
          *[f"- run {x['run']} ({x['date']}, rows: {x['selector']}): `PYTHONPATH=.gpu/site:. python3 -m bench.mixtral_bench "
            f"{' '.join((x.get('argv') or [])[1:])}`" for x in results.get("sources", [])],
          f"- H2D: {results.get('bandwidth')}",
          "- random weights; each decode step's input token comes from a fixed random stream (teacher forcing: a "
          "random model's greedy output loops on one token, which would freeze routing); argmax is still computed "
          "and compared with (a). Measured LRU hit rates are above k/8: random routers on a residual stream with a "
          "shared direction prefer a few experts per layer. Real Mixtral routing differs; the hit rate column is "
          "what the floor uses. Batch 1, bf16 activations, 4-bit attention (our Triton GEMV), experts through "
          "coordinator.gpu_kernels in every variant. (c) `c_offloading_eager` is mixtral-offloading's design (transformers' eager "
          "forward, per-layer LRU, misses copied from pinned memory, no prefetch, no graphs) on our coordinator in "
          "process; (c') `c_lru_pinned` is the same LRU inside our graphed loop, an ablation of (d). (d)/(e) rows are the real coordinator process (sampling at "
          "temperature 1), `d_inloop_*` rows our decode loop fed by the real worker processes.", ""]
    tl = _timelines(results)
    if tl:
        md += ["## Where the device time goes (ms per token, --timeline)", "", *tl, ""]
    for h, b in ((head, body), (rhead, rbody)):
        md += ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        md += ["| " + " | ".join(row) + " |" for row in b]
        md.append("")
    k = results.get("kernels", {})
    if k.get("ms"):
        md += ["## One expert FFN at batch 1 (ms)", "", "| path | ms |", "|---|---|"]
        md += [f"| {n} | {v:.4f} |" for n, v in k["ms"].items()]
        md.append("")
    k3 = results.get("kernels3") or k.get("bits3") or {}
    if k3.get("ms"):
        md += [f"## 3-bit experts ({k3.get('packing')}, {k3.get('expert_bytes', 0) / 1e6:.1f} MB), batch 1 (ms)", "",
               f"rel. error against hqq's dequantize + matmul: {k3.get('rel_err_vs_hqq', float('nan')):.2e}; launch "
               f"shapes installed for the runs: {k3.get('best_configs')}", "", "| path | ms |", "|---|---|"]
        md += [f"| {n} | {v:.4f} |" for n, v in k3["ms"].items()]
        md.append("")
    return "\n".join(md)
