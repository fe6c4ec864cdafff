"""``python -m client``: send a prompt to a coordinator from the shell.

    python -m client generate "PROMPT" --address HOST:PORT [--max-new-tokens N] [--temperature T]
                                       [--top-p P] [--seed S] [--stream] [--stats] [--timeout S]
    python -m client stats --address HOST:PORT
    python -m client health --address HOST:PORT
    (each also takes --timeout S, --token-file F, --tls-root-cert PEM)

Exit status: 0 on success, 1 when the server answers with an error (printed as ``error: CODE: message``),
2 for bad command-line arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

from client import Client, ClientError
from expert_workers.security import load_token

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="Client for the MoE coordinator.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for a prompt and print it")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: nondeterministic)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    gen.add_argument("--stats", action="store_true", help="print the request's stats (JSON) after the text")
    for p in (gen, sub.add_parser("stats", help="print server-wide stats (JSON)"),
              sub.add_parser("health", help="print SERVING or NOT_SERVING")):
        p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"coordinator HOST:PORT ({DEFAULT_ADDRESS})")
        p.add_argument("--timeout", type=float, default=60.0, help="per-call deadline in seconds (default 60)")
        p.add_argument("--token-file", default=None,
                       help="file holding the shared auth token (default: $MOE_AUTH_TOKEN, if set)")
        p.add_argument("--tls-root-cert", default=None, help="PEM root certificate: connect over TLS")
    return parser


def _generate(c: Client, args: argparse.Namespace) -> None:
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  seed=args.seed)
    if args.stream:
        tokens = c.stream(args.prompt, **kwargs)
        for chunk in tokens:
            print(chunk.text, end="", flush=True)
        print()
        result = tokens.result()
    else:
        result = c.generate(args.prompt, **kwargs)
        print(result.text)
    if args.stats:
        print(json.dumps({"finish_reason": result.finish_reason, "token_ids": result.token_ids,
                          "stats": result.stats}, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        token = load_token(args.token_file)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        with Client(args.address, timeout_s=args.timeout, token=token, tls_root_cert=args.tls_root_cert) as c:
            if args.command == "generate":
                _generate(c, args)
            elif args.command == "stats":
                print(json.dumps(c.stats(), indent=2))
            else:
                print(c.health())
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
