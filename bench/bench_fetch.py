"""CPU fetch benchmark: one ~57 MB expert from a worker process, over gRPC streaming vs. the zero-copy path.

    .venv/bin/python bench/bench_fetch.py [--repeats 10] [--chunk-mib 1 2 4]

The expert is a Mixtral-sized byte count: bits 16 (passthrough) of w1/w3 [2304, 4096] and w2 [4096, 2304] in
fp16 is 56.6 MB, the size of a 2-bit g64 Mixtral-8x7B expert (14336x4096x3 at 2.5 bits/weight = 55 MB). Bytes
are bytes to the transport, and this avoids 4 minutes of CPU quantization. The worker is a real
``python -m expert_workers serve`` process on 127.0.0.1.

Paths measured (each fetch verifies the xxh3 checksum unless noted):
- grpc stream:   RemoteSource(prefer_zero_copy=False).fetch_into, chunks of the given size
- shm copy:      RemoteSource.fetch_into from the co-located worker's shared memory (memcpy + checksum)
- shm view+copy: host_view (verified once) + one copy into a buffer: what the coordinator does per miss
- host_view:     the zero-copy view alone (no bytes move; what a GPU copy would read from directly)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from expert_workers.fetch import RemoteSource  # noqa: E402
from expert_workers.format import ExpertKey, checksum  # noqa: E402


def write_checkpoint(path: Path, hidden: int, inter: int) -> None:
    """A one-layer, one-expert Mixtral checkpoint (fp16) whose expert has the given shapes."""
    config = {"model_type": "mixtral", "num_hidden_layers": 1, "num_local_experts": 1, "num_experts_per_tok": 1,
              "hidden_size": hidden, "intermediate_size": inter}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    pre = "model.layers.0.block_sparse_moe.experts.0"
    tensors = {f"{pre}.w1.weight": torch.randn(inter, hidden, generator=g).half(),
               f"{pre}.w3.weight": torch.randn(inter, hidden, generator=g).half(),
               f"{pre}.w2.weight": torch.randn(hidden, inter, generator=g).half()}
    save_file(tensors, path / "model.safetensors")


def start_worker(ckpt: Path, cache: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "expert_workers", "serve", "--model", str(ckpt), "--shard", "0/1", "--port", "0",
           "--expert-bits", "16", "--cache-dir", str(cache), "--no-progress", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"serving on (\S+:\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"worker did not start: {line!r}")
    return proc, m.group(1)


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: connections, mappings, first-touch page faults
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def row(name: str, nbytes: int, times: list[float], moves_bytes: bool = True) -> str:
    med, best = statistics.median(times), min(times)
    if not moves_bytes:
        return f"| {name} | {med * 1e3:.3f} | no copy | no copy |"
    return f"| {name} | {med * 1e3:.2f} | {nbytes / med / 1e9:.2f} | {nbytes / best / 1e9:.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--chunk-mib", type=float, nargs="+", default=[1, 2, 4])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=2304)
    args = ap.parse_args()
    key = ExpertKey(0, 0)
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        write_checkpoint(Path(tmp) / "ckpt", args.hidden, args.intermediate)
        proc, address = start_worker(Path(tmp) / "ckpt", Path(tmp) / "cache")
        try:
            rows = []
            local = RemoteSource([address])
            nbytes = local.manifest(key).nbytes
            out = torch.empty(nbytes, dtype=torch.uint8)
            for mib in args.chunk_mib:
                with RemoteSource([address], prefer_zero_copy=False, chunk_bytes=int(mib * 2**20)) as remote:
                    rows.append(row(f"grpc stream, {mib:g} MiB chunks", nbytes,
                                    timed(lambda: remote.fetch_into(key, out), args.repeats)))
            rows.append(row("shm copy (fetch_into)", nbytes, timed(lambda: local.fetch_into(key, out), args.repeats)))
            rows.append(row("shm view + copy", nbytes,
                            timed(lambda: out.copy_(local.host_view(key)), args.repeats)))  # type: ignore[arg-type]
            rows.append(row("host_view alone (zero-copy)", nbytes, timed(lambda: local.host_view(key), args.repeats),
                            moves_bytes=False))
            rows.append(row("xxh3 checksum alone", nbytes, timed(lambda: checksum(out), args.repeats)))
            assert local.stats()["checksum_failures"] == 0
            local.close()
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"expert: {nbytes / 1e6:.1f} MB, {args.repeats} repeats after one warm-up, worker on {address}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| path | median ms | GB/s (median) | GB/s (best) |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
