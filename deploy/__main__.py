"""``python -m deploy``: run the MoE serving system on a Ray cluster.

    python -m deploy up --model M --workers N [--replicas R] [--port P] [--expert-bits B] [--attn-bits B] ...
                        [--auth-token-file F] [--tls-cert PEM --tls-key PEM --tls-root PEM]
    python -m deploy status [--json]
    python -m deploy scale N [--replicas R]
    python -m deploy down
    python -m deploy demo            # what `make demo` runs: local Ray, up, one prompt, down, Ray stopped

Every command but ``demo`` joins the running cluster at ``--address`` (default ``$RAY_ADDRESS``, else the
latest local ``ray start``). Exit status: 0 on success, 1 on failure (message on stderr), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from deploy.spec import (ATTN_BITS, DECODE_MODES, EVICTIONS, EXPERT_BITS, META_BITS, NAMESPACE, DeployError,
                         DeploySpec)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="place expert workers, start the coordinator, wait until SERVING")
    up.add_argument("--model", required=True, help="checkpoint directory (on every node) or smollm2-moe / tiny-random")
    up.add_argument("--workers", type=int, required=True, help="shards N (expert worker actors per replica)")
    up.add_argument("--replicas", type=int, default=1, help="copies R of every shard [1]")
    up.add_argument("--port", type=int, default=50051, help="coordinator port; 0 picks a free one [50051]")
    up.add_argument("--host", default="127.0.0.1", help="interface the coordinator binds [127.0.0.1]")
    up.add_argument("--expert-bits", type=int, default=2, choices=EXPERT_BITS, help="hqq bits of experts [2]")
    up.add_argument("--group-size", type=int, default=64, help="hqq group size of experts [64]")
    up.add_argument("--meta-bits", type=int, default=16, choices=META_BITS,
                    help="bits of each expert group's scale and zero; 8: codes into a table per matrix [16]")
    up.add_argument("--attn-bits", type=int, default=4, choices=ATTN_BITS, help="hqq bits of attention [4]")
    up.add_argument("--lm-head-bits", type=int, default=16, choices=ATTN_BITS,
                    help="hqq bits of the coordinator's lm_head (an untied one) [16]")
    up.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="coordinator device [cuda if its node has a GPU]")
    mem = up.add_mutually_exclusive_group()
    mem.add_argument("--experts-per-layer", type=int, default=None, help="coordinator cache slots per layer")
    mem.add_argument("--gpu-memory-gb", type=float, default=None, help="coordinator device memory budget")
    up.add_argument("--prefetch", type=int, default=2, help="next-layer experts to prefetch, 0 = off [2]")
    up.add_argument("--prefetch-ahead", type=int, choices=(1, 2), default=1,
                    help="layers the coordinator's decoder guesses ahead [1]")
    up.add_argument("--repartition-every", type=int, default=32, metavar="STEPS",
                    help="coordinator: steps between two plans of each layer's cache slots, 0 = evenly spread [32]")
    up.add_argument("--eviction", choices=EVICTIONS, default="lrfu",
                    help="coordinator: which expert a full cache layer evicts [lrfu]")
    up.add_argument("--no-admission", action="store_true",
                    help="coordinator: every miss joins the cache (default: with lrfu, only one worth more than "
                         "what it would evict)")
    up.add_argument("--decode", choices=DECODE_MODES, default="auto",
                    help="coordinator single-token steps: graphs, static, transformers, or auto [auto]")
    up.add_argument("--no-speculate", action="store_true",
                    help="coordinator decoder: wait for each layer's routing before queuing the next segment")
    up.add_argument("--no-pipeline", action="store_true",
                    help="coordinator: read each token on the host before queuing the next decode step")
    up.add_argument("--expert-host", type=float, default=1.0,
                    help="units of the expert_host resource per worker [1]")
    up.add_argument("--auth-token-file", default=None, metavar="FILE",
                    help="shared token (same path on every node): workers and coordinator require it, workers "
                         "bind their node's IP so other machines reach them [none: loopback only]")
    up.add_argument("--tls-cert", default=None, metavar="PEM",
                    help="server certificate of workers and coordinator (same path on every node): TLS on")
    up.add_argument("--tls-key", default=None, metavar="PEM", help="its private key (same path on every node)")
    up.add_argument("--tls-root", default=None, metavar="PEM",
                    help="CA certificate that signed --tls-cert (the certificate itself when self-signed)")
    up.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for SERVING [1800]")
    st = sub.add_parser("status", help="the coordinator and every worker: node, pid, address, shard, health")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    sc = sub.add_parser("scale", help="re-shard onto N workers (new actors, switch, old ones removed)")
    sc.add_argument("workers", type=int, help="new number of shards N")
    sc.add_argument("--replicas", type=int, default=None, help="new number of replicas [unchanged]")
    sub.add_parser("down", help="stop the coordinator and remove every worker")
    demo = sub.add_parser("demo", help="the whole system on one machine, one prompt, then everything stopped")
    from deploy.demo import add_demo_args

    add_demo_args(demo)
    for cmd in (up, st, sc, sub.choices["down"]):
        cmd.add_argument("--address", default=None, help="Ray cluster HOST:PORT [$RAY_ADDRESS or auto]")
        cmd.add_argument("--namespace", default=NAMESPACE, help=f"Ray namespace of the deployment [{NAMESPACE}]")
    return p


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def print_status(report: dict[str, Any]) -> None:
    """The status as two tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    c = report["coordinator"]
    console = Console(width=None if sys.stdout.isatty() else 200)  # a pipe: never truncate columns
    meta = " (8-bit meta)" if c.get("meta_bits") == 8 and c["expert_bits"] != 16 else ""
    console.print(f"coordinator {c['address']}  health {c['health']}  node {c['node']}  pid {c['pid']}  "
                  f"model {c['model']} on {c['device']}  {c['workers']} shards x {c['replicas']} replicas  "
                  f"experts {c['expert_bits']}-bit{meta}  attention {c['attn_bits']}-bit  "
                  f"generation {c['generation']}  "
                  f"auth {'token' if c['auth'] else 'none'}  tls {'on' if c['tls'] else 'off'}")
    table = Table("worker", "node", "pid", "address", "shards", "replica", "health", "bytes")
    for w in report["workers"]:
        table.add_row(w["name"], w["node"], str(w["pid"]), str(w["address"]), w["shards"], str(w["replica"]),
                      w["health"], _human_bytes(w["bytes"]))
    console.print(table)


def _absolute(path: str | None) -> str | None:
    """A file path as every process of the deployment must see it (they run in other directories)."""
    return str(Path(path).expanduser().absolute()) if path else None


def _spec(args: argparse.Namespace) -> DeploySpec:
    return DeploySpec(model=args.model, workers=args.workers, replicas=args.replicas, port=args.port,
                      host=args.host, expert_bits=args.expert_bits, group_size=args.group_size,
                      meta_bits=args.meta_bits,
                      attn_bits=args.attn_bits, lm_head_bits=args.lm_head_bits, device=args.device,
                      experts_per_layer=args.experts_per_layer,
                      gpu_memory_gb=args.gpu_memory_gb, prefetch=args.prefetch, prefetch_ahead=args.prefetch_ahead,
                      repartition_every=args.repartition_every, eviction=args.eviction,
                      admission=not args.no_admission, decode=args.decode,
                      speculate=not args.no_speculate, pipeline=not args.no_pipeline,
                      namespace=args.namespace,
                      expert_host=args.expert_host, auth_token_file=_absolute(args.auth_token_file),
                      tls_cert=_absolute(args.tls_cert), tls_key=_absolute(args.tls_key),
                      tls_root=_absolute(args.tls_root), ready_timeout_s=args.timeout)


def _run(args: argparse.Namespace) -> int:
    from deploy.cluster import connect, prepare_loopback_env

    spec = None
    if args.command == "up":  # validate the settings before touching the cluster
        spec = _spec(args)
        spec.check_files()
    elif args.command == "scale" and (args.workers < 1 or (args.replicas is not None and args.replicas < 1)):
        raise ValueError("scale needs N >= 1 (and --replicas >= 1)")
    prepare_loopback_env(args.address)  # before `ray` is imported
    from deploy import launcher

    connect(args.address, args.namespace)
    if spec is not None:
        state = launcher.up(spec)
        print(f"coordinator: {state['address']}", flush=True)
    elif args.command == "status":
        report = launcher.status(args.namespace)
        print(json.dumps(report, indent=2)) if args.json else print_status(report)
    elif args.command == "scale":
        state = launcher.scale(args.namespace, args.workers, args.replicas)
        print(f"coordinator: {state['address']}", flush=True)
    else:
        removed = launcher.down(args.namespace)
        print(f"removed {len(removed)} actors" if removed else f"nothing deployed in {args.namespace!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from deploy.demo import run_demo

        return run_demo(args)
    from client import ClientError
    from deploy.cluster import ClusterError

    try:
        return _run(args)
    except ValueError as e:  # a bad setting (DeploySpec validation)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (DeployError, ClusterError, ClientError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
