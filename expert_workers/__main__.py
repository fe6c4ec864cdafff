"""``python -m expert_workers serve``: one expert worker as a plain process (no Ray).

    python -m expert_workers serve --model M --shard I/N --port P [--host 127.0.0.1]
                                   [--expert-bits {2,3,4,8,16}] [--group-size G] [--meta-bits {16,8}]
                                   [--replica R] [--cache-dir D]
                                   [--auth-token-file F] [--tls-cert PEM --tls-key PEM]

Binds at once (health NOT_SERVING, expert RPCs UNAVAILABLE), quantizes or reloads its shard, then prints exactly
``expert worker serving on HOST:PORT``. SIGTERM/SIGINT stop it gracefully and unlink its shared memory.
A host other than loopback needs a shared token (``--auth-token-file`` or ``$MOE_AUTH_TOKEN``): without one the
worker exits with status 2 before binding anything.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from expert_workers.format import ALL_BITS, META_BITS, QuantSpec

log = logging.getLogger("expert_workers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m expert_workers", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve one shard of a model's experts over gRPC")
    s.add_argument("--model", required=True, help="checkpoint directory, or tiny-random / smollm2-moe")
    s.add_argument("--shard", default="0/1", help="I/N: serve experts with (layer*E+expert) %% N == I [0/1]")
    s.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    s.add_argument("--host", default="127.0.0.1",
                   help="interface to bind [127.0.0.1]; any other needs a shared token")
    s.add_argument("--auth-token-file", default=None,
                   help="file holding the shared token every caller must send [$MOE_AUTH_TOKEN]")
    s.add_argument("--tls-cert", default=None, help="server certificate (PEM); with --tls-key turns TLS on")
    s.add_argument("--tls-key", default=None, help="server private key (PEM)")
    s.add_argument("--expert-bits", type=int, default=2, choices=ALL_BITS,
                   help="hqq bits; 16 keeps the checkpoint's weights unquantized [2]")
    s.add_argument("--group-size", type=int, default=64, help="hqq group size [64]")
    s.add_argument("--meta-bits", type=int, default=16, choices=META_BITS,
                   help="bits of each group's scale and zero: 16 as hqq keeps them, or 8, codes into a table per "
                        "matrix (2-bit g64 experts 10%% smaller) [16]")
    s.add_argument("--replica", type=int, default=0, help="which copy of the shard this is [0]")
    s.add_argument("--cache-dir", default=None,
                   help="quantized-expert cache directory [$MOE_CACHE_DIR/experts]")
    s.add_argument("--threads", type=int, default=16, help="gRPC handler threads [16]")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--log-level", default="INFO", help="logging level [INFO]")
    # Test-only fault injection (see service.FaultInjection): deliberately not in --help or the README.
    s.add_argument("--inject-delay-ms", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--inject-corrupt-every", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--inject-truncate-every", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--inject-hold-load-while", default="", help=argparse.SUPPRESS)
    return p


def serve(args: argparse.Namespace) -> int:
    """Runs one worker until SIGTERM/SIGINT; returns the exit status."""
    from expert_workers.security import load_token
    from expert_workers.server import ServerConfig, WorkerServer
    from expert_workers.service import FaultInjection
    from expert_workers.store import ExpertStore

    fault = FaultInjection(delay_ms=args.inject_delay_ms, corrupt_every=args.inject_corrupt_every,
                           truncate_every=args.inject_truncate_every, hold_load_while=args.inject_hold_load_while)
    config = ServerConfig(host=args.host, port=args.port, max_workers=args.threads, fault=fault,
                          auth_token=load_token(args.auth_token_file), tls_cert=args.tls_cert, tls_key=args.tls_key)
    config.security.validate()  # refuse a bad bind before reading the model or binding anything
    spec = QuantSpec(bits=args.expert_bits, group_size=args.group_size, meta_bits=args.meta_bits)
    store = ExpertStore(args.model, args.shard, spec, replica=args.replica, cache_dir=args.cache_dir,
                        progress=not args.no_progress)
    server = WorkerServer(store, config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    failure: list[BaseException] = []

    def load() -> None:
        try:
            fault.wait_before_load(stop)
            if not stop.is_set():
                store.load()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread, which exits non-zero
            failure.append(e)
            stop.set()

    server.start()
    # Load in a thread so a signal during a long quantization still stops the process promptly.
    loader = threading.Thread(target=load, name="expert-load", daemon=True)
    loader.start()
    while loader.is_alive() and not stop.wait(0.2):
        pass
    try:
        if failure:
            log.error("loading shard %s of %s failed: %s", args.shard, args.model, failure[0],
                      exc_info=failure[0])
            return 1
        if store.ready:
            server.set_serving(True)
            print(f"expert worker serving on {server.address}", flush=True)
            stop.wait()
        log.info("stopping expert worker %s", server.address)
        return 0
    finally:
        server.stop()
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(args)
    except (ValueError, FileNotFoundError, OSError, MemoryError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
