"""``python -m deploy demo`` (what ``make demo`` runs): the whole system on this machine, then nothing left.

1. a private Ray head on 127.0.0.1 offering ``expert_host`` (``deploy.local_ray.LocalRay``);
2. ``python -m deploy up`` (the real CLI, as a user would run it) with the embedded ``smollm2-moe``;
3. one prompt through ``client.Client`` (streamed), then the text and the stats;
4. ``python -m deploy status`` and ``python -m deploy down``;
5. the Ray head stopped, and a check that none of its processes is left.

Defaults favour a quick first run on a 2-core CPU machine: experts and attention unquantized (exact mode:
the output equals dense SmolLM2's). ``--expert-bits 4 --attn-bits 4`` shows hqq quantization (slower the first
time: quantized experts are cached on disk afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from deploy.local_ray import LocalRay, free_port

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROMPT = "The three primary colors are"
ADDRESS_LINE = re.compile(r"^coordinator: (\S+:\d+)$", re.M)


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """The demo's flags (all optional)."""
    p.add_argument("--model", default="smollm2-moe", help="model to serve [smollm2-moe]")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt [{DEFAULT_PROMPT!r}]")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate [32]")
    p.add_argument("--workers", type=int, default=2, help="expert worker shards [2]")
    p.add_argument("--expert-bits", type=int, default=16, help="hqq bits of experts; 16 = unquantized [16]")
    p.add_argument("--attn-bits", type=int, default=16, help="hqq bits of attention; 16 = unquantized [16]")
    p.add_argument("--experts-per-layer", type=int, default=4, help="coordinator cache slots per layer [4]")
    p.add_argument("--auth-token-file", default=None, metavar="FILE",
                   help="deploy with this shared token (workers and coordinator require it) [none]")


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _run_cli(args: list[str], env: dict[str, str], timeout_s: float) -> str:
    """Runs ``python -m <args>`` with its output shown live; returns the output, raises if it fails."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    assert proc.stdout is not None
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            out.append(line)
            print(f"   {line}", end="", flush=True)
    finally:
        timer.cancel()
    if proc.wait() != 0:
        raise RuntimeError(f"`python -m {' '.join(args)}` failed with exit status {proc.returncode}")
    return "".join(out)


def _generate(address: str, prompt: str, max_new_tokens: int, token_file: str | None) -> dict[str, float | int]:
    from client import Client
    from expert_workers.security import load_token

    with Client(address, timeout_s=600, token=load_token(token_file)) as c:
        print(f"prompt: {prompt}", flush=True)
        print("output: ", end="", flush=True)
        tokens = c.stream(prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        for chunk in tokens:
            print(chunk.text, end="", flush=True)
        result = tokens.result()
        print(f"\n\nfinish_reason: {result.finish_reason}   tokens: {len(result.token_ids)}", flush=True)
        print("stats:", json.dumps(result.stats, indent=2), flush=True)
        return result.stats


def run_demo(args: argparse.Namespace) -> int:
    """Runs the demo; 0 when every step worked and nothing was left running."""
    ray_head = LocalRay(expert_host=max(8, args.workers), dashboard=False)
    env = {**ray_head.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    deployed = False
    _step(f"starting a local Ray head on {ray_head.address} (loopback only)")
    ray_head.start()
    try:
        _step(f"deploy up: {args.model}, {args.workers} expert workers")
        # absolute: `deploy up` runs in the repository, not in the caller's directory
        auth = ["--auth-token-file", str(Path(args.auth_token_file).absolute())] if args.auth_token_file else []
        out = _run_cli(["deploy", "up", "--model", args.model, "--workers", str(args.workers),
                        "--port", str(free_port()), "--expert-bits", str(args.expert_bits),
                        "--attn-bits", str(args.attn_bits), "--experts-per-layer", str(args.experts_per_layer),
                        *auth], env, timeout_s=1800)
        deployed = True
        match = ADDRESS_LINE.search(out)
        if not match:
            raise RuntimeError("deploy up did not print `coordinator: HOST:PORT`")
        _step(f"generating through the client ({match.group(1)})")
        _generate(match.group(1), args.prompt, args.max_new_tokens, args.auth_token_file)
        _step("deploy status")
        _run_cli(["deploy", "status"], env, timeout_s=120)
    finally:
        if deployed:
            _step("deploy down")
            _run_cli(["deploy", "down"], env, timeout_s=300)
        _step("stopping Ray")
        pids = ray_head.pids()  # the head and everything below it: raylet, workers, the coordinator process
        survivors = ray_head.stop()
        print(f"stopped {len(pids)} processes: {' '.join(map(str, pids))}", flush=True)
    if survivors:
        print(f"error: {len(survivors)} processes had to be killed after Ray stopped: {survivors}", file=sys.stderr)
        return 1
    print("done: every process stopped", flush=True)
    return 0
