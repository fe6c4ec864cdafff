"""Host→GPU copies straight out of another process's POSIX shared memory, with and without
``cudaHostRegister`` on this process's mapping (the co-located zero-copy path of issue 6)."""

from __future__ import annotations

import subprocess
import sys
import time
from multiprocessing import resource_tracker, shared_memory

import torch

_CHILD = """
import sys
from multiprocessing import shared_memory
n = int(sys.argv[1])
shm = shared_memory.SharedMemory(create=True, size=n)
shm.buf[:n] = b"\\x01" * n
print(shm.name, flush=True)
sys.stdin.readline()
shm.close(); shm.unlink()
"""


def _h2d_GBps(src: torch.Tensor, chunk: int, reps: int = 2) -> float:
    dst = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    n = src.numel() // chunk
    dst.copy_(src[:chunk], non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        for i in range(n):
            dst.copy_(src[i * chunk:(i + 1) * chunk], non_blocking=True)
    torch.cuda.synchronize()
    return reps * n * chunk / (time.perf_counter() - t0) / 1e9


def probe(nbytes: int = 2 << 30, chunk: int = 55 << 20) -> dict[str, float | bool | str]:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(nbytes)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        name = child.stdout.readline().strip()
        shm = shared_memory.SharedMemory(name=name)
        try:  # Python ≤ 3.12 would unlink the writer's segment when this reader exits
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            pass
        src = torch.frombuffer(shm.buf, dtype=torch.uint8)
        out: dict[str, float | bool | str] = {"segment_bytes": nbytes}
        out["unregistered_GBps"] = _h2d_GBps(src, chunk, reps=1)
        cudart = torch.cuda.cudart()
        t0 = time.perf_counter()
        err = cudart.cudaHostRegister(src.data_ptr(), nbytes, 0)
        out["register_s"] = time.perf_counter() - t0
        out["register_error"] = str(err)
        out["is_pinned_after_register"] = bool(src.is_pinned())
        out["registered_GBps"] = _h2d_GBps(src, chunk)
        cudart.cudaHostUnregister(src.data_ptr())
        del src
        try:
            shm.close()
        except BufferError:  # a view may outlive us until GC; the mapping goes with the process
            pass
        return out
    finally:
        if child.stdin:
            child.stdin.write("\n")
            child.stdin.flush()
        child.wait(30)


if __name__ == "__main__":
    print(probe())
