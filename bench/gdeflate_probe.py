"""Would entropy-coded expert copies pay? nvCOMP's GDeflate on one Mixtral-sized 2-bit expert (NOTES item 92).

A worker would compress an expert's packed codes once on its CPU (nvCOMP's ``libnvcomp_cpu``, libdeflate
inside), the copy would move ~0.81 of the bytes, and the GPU would decode them into the slot (nvCOMP's batched
GDeflate kernels). It pays only if the decode, on the critical path, costs less than the copy it saves
(~0.15 ms an expert at 55 GB/s). This probe measures both halves. On the GPU it adds a row for nvCOMP's ANS
(rANS over bytes: entropy coding without GDeflate's LZ stage, which finds nothing in i.i.d. codes), whose
decoder may be faster; it has no CPU encoder, so the GPU encodes it there, and using it would mean encoding
on the coordinator's GPU rather than on the workers.

    make gpu-nvcomp          # here (PyPI): the CUDA 13 wheels unpacked into .gpu/nvcomp, ~28 MB
    python -m bench.gdeflate_probe --cpu-only          # here: ratio and CPU round trip, byte-exact
    PYTHONPATH=.gpu/nvcomp:.gpu/site:. python3 -m bench.gdeflate_probe   # on the GPU (carry .gpu)

The codes are drawn i.i.d. with hqq's measured level frequencies (``bench.code_entropy``: 0.075 / 0.425 /
0.425 / 0.075) and packed four to a byte as hqq's 2bit_u8, so the bytes have the statistics of a real
expert's without quantizing 176 M weights first.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 1 << 16
"""GDeflate's largest chunk (nvcompGdeflateCPUCompressionMaxAllowedChunkSize)."""
LEVELS = (0.075, 0.425, 0.425, 0.075)
EXPERT_CODE_BYTES = 3 * 14336 * 4096 // 4
"""Mixtral's w1, w3, w2 at 2 bits: 44 MB of packed codes."""
_COMPRESS = "_ZN6nvcomp8gdeflate11compressCPUEPKPKvPKmmmPKPvPmi"
_DECOMPRESS = "_ZN6nvcomp8gdeflate13decompressCPUEPKPKvPKmmPKPvPmSA_"
_BOUND = "_ZN6nvcomp8gdeflate32compressCPUGetMaxOutputChunkSizeEmPm"


def packed_codes(nbytes: int, seed: int = 0) -> np.ndarray:
    """``nbytes`` of 2-bit codes at hqq's level frequencies, packed four to a byte by hqq's own packer."""
    import torch
    from hqq.core.bitpack import BitPack

    c = np.random.default_rng(seed).choice(4, size=4 * nbytes, p=LEVELS).astype(np.uint8)
    return BitPack.pack_2bit_u8(torch.from_numpy(c)).numpy()


def cpu_library() -> ctypes.CDLL:
    """nvCOMP's CPU library, from the ``nvidia-libnvcomp-cu13`` package on the path."""
    import nvidia.libnvcomp

    return ctypes.CDLL(str(Path(nvidia.libnvcomp.__file__).parent / "lib64" / "libnvcomp_cpu.so.6"))


def _ptrs(bufs: list[np.ndarray]) -> ctypes.Array:
    return (ctypes.c_void_p * len(bufs))(*[b.ctypes.data for b in bufs])


def compress(data: np.ndarray, level: int, threads: int) -> list[np.ndarray]:
    """``data`` in CHUNK-byte chunks, each GDeflate-compressed on the CPU (one call per thread's share)."""
    lib = cpu_library()
    bound = ctypes.c_size_t()
    getattr(lib, _BOUND)(ctypes.c_size_t(CHUNK), ctypes.byref(bound))
    chunks = [data[i:i + CHUNK] for i in range(0, data.size, CHUNK)]

    def run(part: list[np.ndarray]) -> list[np.ndarray]:
        outs = [np.empty(bound.value, np.uint8) for _ in part]
        sizes = (ctypes.c_size_t * len(part))()
        getattr(lib, _COMPRESS)(_ptrs(part), (ctypes.c_size_t * len(part))(*[c.size for c in part]),
                                ctypes.c_size_t(CHUNK), ctypes.c_size_t(len(part)), _ptrs(outs), sizes,
                                ctypes.c_int(level))
        return [o[:n].copy() for o, n in zip(outs, sizes)]

    step = -(-len(chunks) // threads)
    with ThreadPoolExecutor(threads) as pool:
        return [c for part in pool.map(run, [chunks[i:i + step] for i in range(0, len(chunks), step)]) for c in part]


def decompress_cpu(chunks: list[np.ndarray], nbytes: int) -> np.ndarray:
    """The CPU decoder, to check the round trip."""
    lib = cpu_library()
    out = np.empty(nbytes, np.uint8)
    outs = [out[i:i + CHUNK] for i in range(0, nbytes, CHUNK)]
    n = len(chunks)
    sizes = (ctypes.c_size_t * n)()
    getattr(lib, _DECOMPRESS)(_ptrs(chunks), (ctypes.c_size_t * n)(*[c.size for c in chunks]), ctypes.c_size_t(n),
                              _ptrs(outs), (ctypes.c_size_t * n)(*[o.size for o in outs]), sizes)
    if list(sizes) != [o.size for o in outs]:
        raise RuntimeError("GDeflate CPU round trip: wrong chunk sizes")
    return out


ALIGN_IN = 16
"""Compressed chunks sit at 16-byte offsets (nvCOMP: "if in doubt, use 16B alignment")."""


def chunk_spans(nbytes: int, lo: int = 0, hi: int | None = None) -> tuple[list[int], list[int]]:
    """(offsets, sizes) of CHUNK-byte chunks lo..hi-1 of ``nbytes`` (all of them by default; the last may be
    short)."""
    chunks = range(lo, -(-nbytes // CHUNK) if hi is None else hi)
    return [i * CHUNK for i in chunks], [min(CHUNK, nbytes - i * CHUNK) for i in chunks]


def gpu_encode(data: np.ndarray, algorithm: str = "ANS") -> list[np.ndarray]:
    """``data`` in CHUNK-byte chunks, each encoded by nvCOMP on the GPU and brought back to the host: for
    codecs with no CPU encoder in ``libnvcomp_cpu`` (ANS: rANS over bytes, entropy only, no LZ matching)."""
    import torch
    from nvidia import nvcomp

    codec = nvcomp.Codec(algorithm=algorithm, bitstream_kind=nvcomp.BitstreamKind.RAW)
    src = torch.from_numpy(data).cuda()
    torch.cuda.synchronize()  # the codec runs on its own stream
    enc = codec.encode(nvcomp.as_arrays(src, *chunk_spans(data.size)))
    sizes = enc.buffer_sizes  # waits for the encode
    return [torch.utils.dlpack.from_dlpack(enc[i].to_dlpack()).view(torch.uint8).reshape(-1)[:n].cpu().numpy()
            for i, n in enumerate(sizes)]


def packed_chunks(chunks: list[np.ndarray]) -> tuple[list[int], np.ndarray]:
    """The chunks back to back at ALIGN_IN-byte offsets in one host buffer: (offsets, with the end last; buffer)."""
    offsets = [0]
    for c in chunks:
        offsets.append(-(-(offsets[-1] + c.size) // ALIGN_IN) * ALIGN_IN)
    host = np.zeros(offsets[-1], np.uint8)
    for c, o in zip(chunks, offsets):
        host[o:o + c.size] = c
    return offsets, host


def gpu_timings(data: np.ndarray, chunks: list[np.ndarray], repeats: int, parts: int = 8,
                algorithm: str = "GDeflate") -> dict[str, float]:
    """ms for: the plain copy of ``data``; the copy of the compressed chunks; their GPU decode; both
    pipelined (each of ``parts`` pieces decoded on the compute stream as soon as its copy lands)."""
    import torch
    from nvidia import nvcomp

    dev = torch.device("cuda")
    offsets, host = packed_chunks(chunks)
    plain, packed = torch.from_numpy(data).pin_memory(), torch.from_numpy(host).pin_memory()
    d_plain, d_packed = torch.empty_like(plain, device=dev), torch.empty_like(packed, device=dev)
    out = torch.empty(data.size, dtype=torch.uint8, device=dev)
    copy, compute = torch.cuda.Stream(), torch.cuda.current_stream()
    stream = compute.cuda_stream
    codec = nvcomp.Codec(algorithm=algorithm, bitstream_kind=nvcomp.BitstreamKind.RAW, cuda_stream=stream)

    def batches(lo: int, hi: int) -> tuple[Any, Any]:  # chunks lo..hi-1: compressed in d_packed, decoded in out
        return (nvcomp.as_arrays(d_packed, offsets[lo:hi], [c.size for c in chunks[lo:hi]], cuda_stream=stream),
                nvcomp.as_arrays(out, *chunk_spans(data.size, lo, hi), cuda_stream=stream))

    step = -(-len(chunks) // parts)
    pieces = [(lo, min(lo + step, len(chunks)), *batches(lo, min(lo + step, len(chunks))))
              for lo in range(0, len(chunks), step)]  # (first chunk, end chunk, compressed, output), built once
    whole = batches(0, len(chunks))

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / repeats * 1e3

    def pipelined() -> None:
        copy.wait_stream(compute)  # the last round's decodes have read their chunks
        for lo, hi, srcs, outs in pieces:
            with torch.cuda.stream(copy):
                d_packed[offsets[lo]:offsets[hi]].copy_(packed[offsets[lo]:offsets[hi]], non_blocking=True)
                landed = torch.cuda.Event()
                landed.record(copy)
            compute.wait_event(landed)
            decode(srcs, outs)

    d_packed.copy_(packed)
    torch.cuda.synchronize()
    # decode without a config parses the chunks and synchronizes each call; a config built once (one sync,
    # here) makes the later decodes sync-free, as a decode behind a copy has to be
    configs = {id(srcs): codec.decompression_config(srcs) for *_, srcs, _ in pieces}
    configs[id(whole[0])] = codec.decompression_config(whole[0])

    def decode(srcs, outs) -> None:  # type: ignore[no-untyped-def]
        codec.decode(srcs, out=outs, decompression_config=configs[id(srcs)])

    decode(*whole)
    torch.cuda.synchronize()
    if not torch.equal(out.cpu(), torch.from_numpy(data)):
        raise RuntimeError(f"{algorithm} GPU decode differs from the codes")
    return {"copy_plain_ms": timed(lambda: d_plain.copy_(plain, non_blocking=True)),
            "copy_compressed_ms": timed(lambda: d_packed.copy_(packed, non_blocking=True)),
            "decode_ms": timed(lambda: decode(*whole)),
            "copy_then_decode_pipelined_ms": timed(pipelined)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bytes", type=int, default=EXPERT_CODE_BYTES)
    p.add_argument("--levels", default="1,12")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--ans", action=argparse.BooleanOptionalAction, default=True,
                   help="on the GPU, also nvCOMP's ANS (encoded there: it has no CPU encoder)")
    a = p.parse_args()
    data = packed_codes(a.bytes)
    header = "| level | compressed / packed | CPU compress MB/s | CPU decode MB/s, one thread | round trip |" + (
        "" if a.cpu_only else " copy plain ms | copy compressed ms | GPU decode ms | pipelined ms |")
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|")
    for level in map(int, a.levels.split(",")):
        t = time.perf_counter()
        chunks = compress(data, level, a.threads)
        rate = data.size / (time.perf_counter() - t) / 1e6
        t = time.perf_counter()
        back = decompress_cpu(chunks, data.size)  # one thread
        decode_rate = data.size / (time.perf_counter() - t) / 1e6
        ok = np.array_equal(back, data)
        ratio = sum(c.size for c in chunks) / data.size
        row = f"| {level} | {ratio:.4f} | {rate:.0f} | {decode_rate:.0f} | {'exact' if ok else 'DIFFERS'} |"
        if not a.cpu_only:
            row += f" {_cells(gpu_timings(data, chunks, a.repeats))} |"
        print(row, flush=True)
    if a.ans and not a.cpu_only:
        print(ans_row(data, a.repeats), flush=True)
    return 0


def ans_row(data: np.ndarray, repeats: int) -> str:
    """The table's row for nvCOMP's ANS, encoded and decoded on the GPU; an error is a row too, so that the
    GDeflate rows printed before it are not lost."""
    try:
        chunks = gpu_encode(data, "ANS")
        ratio = sum(c.size for c in chunks) / data.size
        times = gpu_timings(data, chunks, repeats, algorithm="ANS")  # raises if the decode differs
        return f"| ANS (GPU encode) | {ratio:.4f} | - | - | exact | {_cells(times)} |"
    except Exception as e:  # noqa: BLE001 - a probe: report and go on
        return f"| ANS (GPU encode) | error: {type(e).__name__}: {str(e)[:200]} |"


def _cells(times: dict[str, float]) -> str:
    return " | ".join(f"{v:.3f}" for v in times.values())


if __name__ == "__main__":
    raise SystemExit(main())
