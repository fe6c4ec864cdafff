"""Chaos run: steady generation load while expert workers are SIGKILLed at random (issue 5).

    .venv/bin/python bench/chaos.py [--model code-moe-22m-path|tiny-random] [--shards 2] [--replicas 2]
                                    [--clients 3] [--requests 40] [--max-new-tokens 24] [--kill-every 2 5]
                                    [--allow-total-outage] [--zero-copy] [--out bench/results/DATE-chaos.md]

Everything runs on 127.0.0.1 as plain processes: ``shards x replicas`` expert workers and one coordinator
(``--no-zero-copy`` unless ``--zero-copy``: the remote-host path, where a dead worker is noticed at once). The same
requests (greedy, seeded prompts) run twice with ``--clients`` concurrent clients: once with no faults, once while
a killer SIGKILLs a random worker every ``--kill-every`` seconds and restarts it on its port. By default it never
kills the last live replica of a shard (every request should then complete); ``--allow-total-outage`` lifts that.
Prints (and writes to ``--out``) requests completed/total, errors by code, outputs that differ from the no-fault
run, p50/p95 latency of both runs, kills, and the coordinator's failover counters.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import shlex
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client import Client, ClientError  # noqa: E402
from deploy.server_process import ServerProcess  # noqa: E402

def start(args: list[str], timeout_s: float = 300.0) -> ServerProcess:
    """A server with one torch thread (the 2-core machine runs several), ready to serve."""
    return ServerProcess.start(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout_s)


class Killer:
    """SIGKILLs a random worker every U(lo, hi) seconds and restarts it on its port right away."""

    def __init__(self, workers: dict[tuple[int, int], ServerProcess], interval: tuple[float, float], total_outage: bool,
                 seed: int) -> None:
        self.workers, self.interval, self.total_outage = workers, interval, total_outage
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.down: set[tuple[int, int]] = set()
        self.events: list[str] = []
        self.kills = self.restarts = 0
        self._lock = threading.Lock()
        self._restarts: list[threading.Thread] = []
        self._t0 = time.monotonic()

    def _note(self, text: str) -> None:
        line = f"t={time.monotonic() - self._t0:6.1f}s {text}"
        self.events.append(line)
        print(f"  [chaos] {line}", flush=True)

    def run(self) -> None:
        while not self.stop_event.wait(self.rng.uniform(*self.interval)):
            with self._lock:
                up = [k for k in self.workers if k not in self.down and (
                    self.total_outage or any(o not in self.down and o != k and o[0] == k[0] for o in self.workers))]
                if not up:
                    continue
                victim = self.rng.choice(sorted(up))
                self.down.add(victim)
            w = self.workers[victim]
            w.proc.send_signal(signal.SIGKILL)
            w.proc.wait()
            self.kills += 1
            self._note(f"SIGKILL shard {victim[0]} replica {victim[1]} (pid {w.proc.pid}, {w.address})")
            t = threading.Thread(target=self._restart, args=(victim,), daemon=True)
            self._restarts.append(t)
            t.start()

    def _restart(self, key: tuple[int, int]) -> None:
        old = self.workers[key]
        for _ in range(5):
            try:
                new = start([*old.args[:old.args.index("--port")], "--port", str(old.port),
                             *old.args[old.args.index("--port") + 2:]])
                break
            except (RuntimeError, TimeoutError) as e:  # e.g. the port is not free yet
                self._note(f"restart of shard {key[0]} replica {key[1]} failed, retrying: {str(e)[-200:]}")
                time.sleep(1)
        else:
            return
        with self._lock:
            self.workers[key] = new
            self.down.discard(key)
            self.restarts += 1
        self._note(f"restarted shard {key[0]} replica {key[1]} (pid {new.proc.pid})")

    def finish(self) -> None:
        self.stop_event.set()
        for t in self._restarts:
            t.join(120)


@dataclass
class Outcome:
    """One request's result."""

    index: int
    tokens: list[int] | None
    error: str
    seconds: float


def run_load(address: str, prompts: list[list[int]], max_new_tokens: int, clients: int,
             label: str) -> list[Outcome]:
    """Every prompt once, ``clients`` at a time; prints progress."""
    done = [0]
    lock = threading.Lock()

    def one(i: int) -> Outcome:
        start_t = time.monotonic()
        try:
            with Client(address, timeout_s=120) as c:
                ids = c.generate(prompt_token_ids=prompts[i], max_new_tokens=max_new_tokens).token_ids
            out = Outcome(i, ids, "", time.monotonic() - start_t)
        except ClientError as e:
            out = Outcome(i, None, e.code, time.monotonic() - start_t)
        with lock:
            done[0] += 1
            if done[0] % 10 == 0 or done[0] == len(prompts):
                print(f"  {label}: {done[0]}/{len(prompts)} requests", flush=True)
        return out

    pool = cf.ThreadPoolExecutor(clients)
    try:
        return list(pool.map(one, range(len(prompts))))
    finally:  # on Ctrl-C: drop the requests not started yet
        pool.shutdown(wait=False, cancel_futures=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "code-moe-22m"))
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--kill-every", type=float, nargs=2, default=(2.0, 5.0), metavar=("MIN_S", "MAX_S"))
    p.add_argument("--experts-per-layer", type=int, default=2)
    p.add_argument("--expert-bits", type=int, default=2)
    p.add_argument("--attn-bits", type=int, default=4)
    p.add_argument("--allow-total-outage", action="store_true")
    p.add_argument("--zero-copy", action="store_true", help="let the coordinator read workers' shm directly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    return p


def main() -> int:
    args = _parser().parse_args()
    os.environ.setdefault("MOE_CACHE_DIR", str(REPO / ".cache" / "chaos"))

    from modelzoo import resolve_model

    model = str(resolve_model(args.model))
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(4, 16))] for _ in range(args.requests)]

    print(f"starting {args.shards} shards x {args.replicas} replicas of {model} ...", flush=True)
    worker_args = {(s, r): ["expert_workers", "serve", "--model", model, "--shard", f"{s}/{args.shards}",
                            "--replica", str(r), "--port", "0", "--expert-bits", str(args.expert_bits),
                            "--no-progress"] for s in range(args.shards) for r in range(args.replicas)}
    workers: dict[tuple[int, int], ServerProcess] = {}
    coordinator = None
    killer = None
    try:
        for key in sorted(worker_args, key=lambda k: (k[1], k[0])):  # replica 0s first: they build the cache
            workers[key] = start(worker_args[key])
        coordinator = start(["coordinator", "serve", "--model", model, "--port", "0", "--device", "cpu",
                             "--workers", ",".join(w.address for w in workers.values()), "--attn-bits",
                             str(args.attn_bits), "--experts-per-layer", str(args.experts_per_layer),
                             "--max-queue", str(args.clients * 2), "--fetch-timeout-s", "5",
                             *([] if args.zero_copy else ["--no-zero-copy"])])
        print(f"coordinator on {coordinator.address}; no-fault run ...", flush=True)
        t0 = time.monotonic()
        baseline = run_load(coordinator.address, prompts, args.max_new_tokens, args.clients, "no-fault")
        base_s = time.monotonic() - t0
        with Client(coordinator.address) as c:
            before = c.stats()
        killer = Killer(workers, tuple(args.kill_every), args.allow_total_outage, args.seed)
        kill_thread = threading.Thread(target=killer.run, daemon=True)
        print("chaos run ...", flush=True)
        t0 = time.monotonic()
        kill_thread.start()
        chaos = run_load(coordinator.address, prompts, args.max_new_tokens, args.clients, "chaos")
        chaos_s = time.monotonic() - t0
        killer.finish()
        after = _settled_stats(coordinator.address, before)
        report = render(args, model, baseline, chaos, base_s, chaos_s, killer, before, after)
    finally:
        if killer is not None:
            killer.finish()
        if coordinator is not None:
            coordinator.stop()
        for w in workers.values():
            w.stop()
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    chaos_ok = sum(o.tokens is not None for o in chaos)
    differ = sum(o.tokens is not None and o.tokens != b.tokens for o, b in zip(chaos, baseline))
    return 0 if differ == 0 and (args.allow_total_outage or chaos_ok == len(chaos)) else 1


def _settled_stats(address: str, before: dict[str, float], wait_s: float = 15.0) -> dict[str, float]:
    """The coordinator's stats once it has seen every killed replica come back (or after ``wait_s``)."""
    with Client(address) as c:
        deadline = time.monotonic() + wait_s
        while True:
            after = c.stats()
            gone = after.get("source_replicas_gone", 0) - before.get("source_replicas_gone", 0)
            back = after.get("source_revivals", 0) - before.get("source_revivals", 0)
            if back >= gone or time.monotonic() > deadline:
                return after
            time.sleep(0.5)


def render(args: argparse.Namespace, model: str, baseline: list[Outcome], chaos: list[Outcome], base_s: float,
           chaos_s: float, killer: Killer, before: dict[str, float], after: dict[str, float]) -> str:
    ok = [o for o in chaos if o.tokens is not None]
    differ = [o.index for o, b in zip(chaos, baseline) if o.tokens is not None and o.tokens != b.tokens]
    errors: dict[str, int] = {}
    for o in chaos:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    base_lat = [o.seconds for o in baseline if o.tokens is not None]
    chaos_lat = [o.seconds for o in ok]
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in (
        "requests", "requests_failed", "source_failovers", "source_replicas_gone", "source_revivals",
        "source_rpc_errors", "source_deadline_exceeded", "source_checksum_failures", "source_unavailable")}
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/chaos.py", *sys.argv[1:]])
    lines = [
        f"# Chaos run ({time.strftime('%Y-%m-%d')})", "",
        "Command (2-core CPU-only dev VM, other jobs running):", "", f"    {cmd}", "",
        f"model `{Path(model).name}`, {args.shards} shards x {args.replicas} replicas (plain processes on 127.0.0.1), "
        f"expert bits {args.expert_bits}, attention bits {args.attn_bits}, k={args.experts_per_layer} per layer, "
        f"{'zero-copy' if args.zero_copy else 'gRPC only (--no-zero-copy)'}; {args.requests} greedy requests x "
        f"{args.max_new_tokens} new tokens, {args.clients} concurrent clients; a random worker SIGKILLed every "
        f"{args.kill_every[0]:g}-{args.kill_every[1]:g} s and restarted on its port"
        f"{'' if args.allow_total_outage else ' (never the last live replica of a shard)'}.", "",
        "| | no-fault run | chaos run |", "|---|---|---|",
        f"| requests completed / total | {len(base_lat)}/{len(baseline)} | {len(ok)}/{len(chaos)} |",
        f"| outputs differing from the no-fault run | - | {len(differ)} |",
        f"| errors by code | - | {json.dumps(errors) if errors else 'none'} |",
        f"| latency p50 (s) | {pct(base_lat, 0.5):.2f} | {pct(chaos_lat, 0.5):.2f} |",
        f"| latency p95 (s) | {pct(base_lat, 0.95):.2f} | {pct(chaos_lat, 0.95):.2f} |",
        f"| latency mean (s) | {statistics.fmean(base_lat) if base_lat else float('nan'):.2f} | "
        f"{statistics.fmean(chaos_lat) if chaos_lat else float('nan'):.2f} |",
        f"| wall time (s) | {base_s:.1f} | {chaos_s:.1f} |",
        f"| workers SIGKILLed / restarted | - | {killer.kills} / {killer.restarts} |", "",
        "Coordinator counters over the chaos run: " + ", ".join(f"{k} {v:g}" for k, v in delta.items()), "",
        "Kill log:", "", *[f"    {e}" for e in killer.events], "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
