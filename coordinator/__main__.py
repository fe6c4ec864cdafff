"""``python -m coordinator serve ...``: the coordinator process; ``replay``: cache hit rates on real text."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from coordinator.config import ATTN_BITS, DECODE_MODES, EVICTIONS, CoordinatorConfig, default_device

log = logging.getLogger("coordinator")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model, expert source and cache flags shared by ``serve`` and ``replay``."""
    p.add_argument("--model", required=True, help="checkpoint directory, or tiny-random / smollm2-moe")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workers", help="expert worker addresses HOST:PORT,HOST:PORT,...")
    src.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                     help="discover the expert workers through Ray (default address: auto)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--gpu-memory-gb", type=float, help="device memory budget; sets the cache size")
    mem.add_argument("--experts-per-layer", type=_positive_int, help="cache slots per layer (k)")
    p.add_argument("--prefetch", type=int, default=2, help="next-layer experts to prefetch (0 = off)")
    p.add_argument("--prefetch-ahead", type=int, choices=(1, 2), default=1,
                   help="layers guessed ahead by the static/graph decoder (2: also the layer after next)")
    p.add_argument("--repartition-every", type=int, default=32, metavar="STEPS",
                   help="with --gpu-memory-gb (or no cache flag): steps between two plans of each layer's cache "
                   "slots from its traffic (0: keep them evenly spread)")
    p.add_argument("--eviction", choices=EVICTIONS, default="lrfu",
                   help="which expert a full cache layer evicts: least recently used, or least recency-weighted "
                   "use count (lrfu)")
    p.add_argument("--admission", action=argparse.BooleanOptionalAction, default=True,
                   help="with lrfu eviction: a miss joins the cache only when it is worth more than what it would "
                   "evict, else it is computed from a prefetch spare (default; --no-admission: every miss joins)")
    p.add_argument("--attn-bits", type=int, choices=ATTN_BITS, default=4, help="hqq bits for attention")
    p.add_argument("--lm-head-bits", type=int, choices=ATTN_BITS, default=16,
                   help="hqq bits for lm_head (untied only): 4 frees 188 MB for expert slots on Mixtral")
    p.add_argument("--allocator-slack-mib", type=int, default=256,
                   help="with --gpu-memory-gb on CUDA: MiB of the cap left unplanned for the allocator's holes")
    p.add_argument("--max-seq-len", type=_positive_int, help="longest prompt+generation (default: the model's)")
    p.add_argument("--prefill-chunk", type=_positive_int, default=512,
                   help="prompt tokens per prefill forward pass (bounds the memory a long prompt needs)")
    p.add_argument("--fetch-workers", type=_positive_int, default=4, help="expert transfers in flight")
    p.add_argument("--fetch-timeout-s", type=float, default=30.0, help="per-expert fetch timeout")
    p.add_argument("--decode", choices=DECODE_MODES, default="auto",
                   help="single-token steps: CUDA graphs over static buffers, the same without graphs, or "
                   "transformers' forward (auto: graphs where they apply)")
    p.add_argument("--no-speculate", action="store_true",
                   help="static/graph decoder: wait for each layer's routing before queuing the next segment")
    p.add_argument("--no-pipeline", action="store_true",
                   help="read each token on the host before queuing the next decode step")
    p.add_argument("--no-zero-copy", action="store_true",
                   help="never read co-located workers' shared memory directly")
    p.add_argument("--no-host-embeddings", action="store_true",
                   help="keep the token embedding table in device memory (default on CUDA: pinned host memory, "
                   "gathered by the GPU, leaving its bytes to expert slots)")
    p.add_argument("--wait-workers-s", type=float, default=600.0,
                   help="how long to wait for the expert workers to become ready at start")
    p.add_argument("--auth-token-file", help="shared token (else $MOE_AUTH_TOKEN): required by this server "
                   "when it binds a non-loopback address, and sent to the expert workers")
    p.add_argument("--worker-tls-root", type=Path, help="CA certificate (PEM) of TLS expert workers")
    p.add_argument("--ray-actor-prefix", default="expert-worker",
                   help="with --ray: expert worker actors are the named actors starting with this")
    p.add_argument("--ray-namespace", default=None, help="with --ray: only actors of this namespace")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m coordinator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the model over gRPC")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument("--max-queue", type=int, default=16, help="waiting requests before RESOURCE_EXHAUSTED")
    serve.add_argument("--reuse-port", action="store_true",
                       help="SO_REUSEPORT: a replacement coordinator may bind the port before this one stops")
    serve.add_argument("--tls-cert", type=Path, help="server certificate (PEM); with --tls-key turns TLS on")
    serve.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    serve.add_argument("--log-level", default="INFO")
    replay = sub.add_parser("replay", help="feed text token by token and report hit rate / prefetch recall")
    add_engine_args(replay)
    replay.add_argument("files", nargs="+", help="text files to replay (each one sequence)")
    replay.add_argument("--k", default="2,3,4,5,6", help="comma-separated slots-per-layer values")
    replay.add_argument("--tokens", type=_positive_int, default=512, help="tokens per sequence")
    replay.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def engine_config(args: argparse.Namespace, **overrides: object) -> CoordinatorConfig:
    return CoordinatorConfig(
        device=args.device or default_device(), experts_per_layer=args.experts_per_layer,
        gpu_memory_gb=args.gpu_memory_gb, prefetch=args.prefetch, prefetch_ahead=args.prefetch_ahead,
        repartition_every=args.repartition_every, eviction=args.eviction, admission=args.admission,
        attn_bits=args.attn_bits, lm_head_bits=args.lm_head_bits,
        allocator_slack_mib=args.allocator_slack_mib,
        max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk, max_queue=getattr(args, "max_queue", 16),
        fetch_workers=args.fetch_workers, fetch_timeout_s=args.fetch_timeout_s,
        zero_copy=not args.no_zero_copy, decode=args.decode, speculate=not args.no_speculate,
        pipeline=not args.no_pipeline, host_embeddings=not args.no_host_embeddings).with_(**overrides)


def open_source(args: argparse.Namespace) -> object:
    """The ExpertSource for ``--workers`` / ``--ray``, waiting up to ``--wait-workers-s`` for readiness."""
    import grpc

    from coordinator.discovery import connect
    from expert_workers.security import AUTH_HEADER, load_token

    token = load_token(args.auth_token_file)
    options: dict[str, object] = {"timeout_s": args.fetch_timeout_s, "prefer_zero_copy": not args.no_zero_copy}
    if token:
        options["metadata"] = [(AUTH_HEADER, f"Bearer {token}")]
    if args.worker_tls_root is not None:
        options["credentials"] = grpc.ssl_channel_credentials(args.worker_tls_root.read_bytes())
    workers = [w.strip() for w in args.workers.split(",") if w.strip()] if args.workers else None
    ray_options = {"prefix": args.ray_actor_prefix, "namespace": args.ray_namespace}
    return connect(workers, args.ray, args.wait_workers_s, ray_options, **options)


def _serve(args: argparse.Namespace) -> int:
    import torch

    from coordinator import device_memory
    from coordinator.engine import Coordinator
    from coordinator.server import serve
    from modelzoo import resolve_model

    from expert_workers.security import SecurityConfig, load_token

    security = SecurityConfig(host=args.host, token=load_token(args.auth_token_file), tls_cert=args.tls_cert,
                              tls_key=args.tls_key)
    security.validate()  # refuse a bad bind before loading anything
    ckpt = resolve_model(args.model)
    source = open_source(args)
    config = engine_config(args)
    if config.gpu_memory_gb is not None and torch.cuda.is_available():
        # before loading: holes that loading's temporaries leave in the weights' fixed segments could not be
        # given back, and under the cap they refused a 32 MiB block with ~200 MiB free (item 77)
        device_memory.expandable_segments()
    engine = Coordinator(ckpt, source, config)  # type: ignore[arg-type]
    engine.cap_device_memory()  # this process owns the device: --gpu-memory-gb bounds its whole footprint
    running = serve(engine, args.host, args.port, args.max_queue, security, reuse_port=args.reuse_port)
    stop = threading.Event()
    _on_signals(lambda: stop.set())
    print(f"coordinator serving on {running.address}", flush=True)
    stop.wait()
    log.info("shutting down")
    running.stop()
    engine.close()
    source.close()  # type: ignore[attr-defined]
    return 0


def _on_signals(handler: Callable[[], None]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: handler())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from expert_workers.source import ExpertNotFound, ExpertUnavailable

    try:
        if args.command == "serve":
            return _serve(args)
        from coordinator.replay import replay_main

        return replay_main(args)
    except (ValueError, OSError, TimeoutError, ExpertUnavailable, ExpertNotFound) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
