"""Expert workers as real processes on 127.0.0.1: the serve CLI, gRPC service, status codes, health, and
RemoteSource (gRPC streaming, zero-copy shared memory, checksums, replica failover)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import REPO, SHARED_MODELS, ServerProcess, spawn_workers, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_workers_store import hqq_reference

from expert_workers import wire
from expert_workers.checkpoint import Checkpoint
from expert_workers.fetch import RemoteSource
from expert_workers.format import INT2, ExpertKey, dequantize_matrix
from expert_workers.source import ExpertNotFound, ExpertUnavailable, make_source

CODE_MOE = SHARED_MODELS / "code-moe-22m"


def start_parallel(jobs: list[list[str]]) -> list[ServerProcess]:
    """conftest.start_server for several commands at once (their imports overlap); all or none keep running."""
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(start_server, job) for job in jobs]
        cf.wait(futures)
    started = [f.result() for f in futures if f.exception() is None]
    if len(started) < len(jobs):
        for s in started:
            s.stop()
        raise next(f.exception() for f in futures if f.exception() is not None)  # type: ignore[misc]
    return started


def spawn_parallel(ckpt: Path, n: int, extra: list[str], replicas: int = 1) -> list[ServerProcess]:
    """Like conftest.spawn_workers (n shards x replicas), started concurrently."""
    return start_parallel([["expert_workers", "serve", "--model", str(ckpt), "--shard", f"{i}/{n}", "--port", "0",
                            "--replica", str(r), *extra] for r in range(replicas) for i in range(n)])


def stop_all(servers: list[ServerProcess]) -> None:
    for s in servers:
        assert s.stop() == 0, "".join(s.lines)


@pytest.fixture(scope="module")
def tiny_workers(tiny_ckpt: Path) -> Iterator[list[ServerProcess]]:
    """tiny-random at 2 bits over 3 shard processes."""
    servers = spawn_parallel(tiny_ckpt, 3, ["--no-progress"])
    yield servers
    stop_all(servers)


def stub(address: str) -> object:
    return wire.pb_grpc.ExpertServiceStub(grpc.insecure_channel(address))


def health(address: str) -> str:
    h = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    status = h.Check(health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME), timeout=5).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def test_every_expert_over_grpc_and_zero_copy_dequantizes_like_hqq(tiny_ckpt: Path, tiny_workers: list[ServerProcess]) -> None:
    addresses = [s.address for s in tiny_workers]
    ckpt = Checkpoint(tiny_ckpt)
    grpc_only = make_source(workers=addresses, prefer_zero_copy=False)
    local = RemoteSource(addresses)
    try:
        assert grpc_only.layout() == ckpt.layout
        out = torch.empty(1 << 16, dtype=torch.uint8)
        for key, weights in ckpt.iter_experts(ckpt.layout.all_keys()):
            m = grpc_only.fetch_into(key, out)
            view = local.host_view(key)
            assert view is not None and grpc_only.host_view(key) is None
            assert torch.equal(view, out[:m.nbytes]) and m == local.manifest(key)
            for name in ("w1", "w3", "w2"):
                ref = hqq_reference(weights[name], INT2)
                assert torch.equal(dequantize_matrix(out, m, name), ref), (key, name)
                assert torch.equal(dequantize_matrix(view, m, name), ref), (key, name)
            copy = torch.zeros_like(out)
            assert local.fetch_into(key, copy) == m and torch.equal(copy[:m.nbytes], out[:m.nbytes])
        g, z = grpc_only.stats(), local.stats()
        assert g["grpc_fetches"] == 32 and g["zero_copy_reads"] == 0 and g["bytes_fetched"] > 0
        assert z["zero_copy_reads"] == 32 and z["shm_copies"] == 32 and z["grpc_fetches"] == 0
        assert g["checksum_failures"] == z["checksum_failures"] == 0
    finally:
        grpc_only.close()
        local.close()


def test_shards_cover_every_expert_exactly_once(tiny_workers: list[ServerProcess]) -> None:
    with RemoteSource([s.address for s in tiny_workers]) as source:
        infos = source.workers()
        held = [k for i in infos for k in i.experts]
        assert sorted(held) == source.layout().all_keys()
        assert {(i.shard_index, i.num_shards) for i in infos} == {(0, 3), (1, 3), (2, 3)}
        assert all(i.ready and i.storage == "shm" and i.spec == INT2 for i in infos)
    with pytest.raises(ValueError, match="do not cover 21 of 32 experts"):
        RemoteSource([tiny_workers[0].address])


@pytest.mark.skipif(not (CODE_MOE / "config.json").is_file(), reason="../shared/models/code-moe-22m not present")
def test_bits16_streams_the_checkpoint_bit_for_bit_with_replicas(tmp_path: Path) -> None:
    """code-moe-22m (fp16, 8x8 experts of 590 KB): 2 shards x 2 replicas, 64 KiB chunks (10 per expert)."""
    servers = spawn_parallel(CODE_MOE, 2, ["--expert-bits", "16", "--no-progress"], replicas=2)
    try:
        source = RemoteSource([s.address for s in servers], prefer_zero_copy=False, chunk_bytes=1)
        ckpt = Checkpoint(CODE_MOE)
        out = torch.empty(2**20, dtype=torch.uint8)
        for key, weights in ckpt.iter_experts(ckpt.layout.all_keys()):
            m = source.fetch_into(key, out)
            for name in ("w1", "w3", "w2"):
                got = dequantize_matrix(out, m, name)
                assert got.dtype == torch.float16 and torch.equal(got, weights[name]), (key, name)
        per_worker = source.worker_stats()
        assert sum(s["fetches"] for s in per_worker.values()) == 64
        assert all(s["fetches"] > 0 for s in per_worker.values())  # both replicas of each shard took load
        for i in range(2):  # each replica set covers every expert exactly once
            held = [k for w in source.workers() if w.replica == i for k in w.experts]
            assert sorted(held) == ckpt.layout.all_keys()
        source.close()
    finally:
        stop_all(servers)


def test_bad_requests_get_status_codes_and_the_server_keeps_serving(tiny_workers: list[ServerProcess]) -> None:
    address = tiny_workers[1].address  # shard 1/3 holds L0E1
    s = stub(address)
    pb = wire.pb

    def code_of(call: object) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as e:
            r = call()
            if hasattr(r, "__iter__"):
                list(r)  # type: ignore[call-overload]
        return e.value.code()

    key = pb.ExpertKey(layer=0, expert=1)
    assert code_of(lambda: s.FetchExpert(pb.FetchExpertRequest(key=pb.ExpertKey(layer=99, expert=1)))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: s.FetchExpert(pb.FetchExpertRequest(key=pb.ExpertKey(layer=0, expert=0)))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: s.GetExpertHandle(pb.GetHandleRequest(key=pb.ExpertKey(layer=1, expert=77)))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: s.FetchExpert(pb.FetchExpertRequest())) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: s.GetExpertHandle(pb.GetHandleRequest())) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: s.FetchExpert(pb.FetchExpertRequest(key=key, chunk_bytes=2**31))) == grpc.StatusCode.INVALID_ARGUMENT
    raw = grpc.insecure_channel(address).unary_unary("/moe.v1.ExpertService/GetExpertHandle")
    assert code_of(lambda: raw(b"\xff\xff\xff garbage")) == grpc.StatusCode.INVALID_ARGUMENT  # not protobuf
    # still serving, and a tiny chunk size is clamped up to 64 KiB (one chunk for a small expert)
    chunks = list(s.FetchExpert(pb.FetchExpertRequest(key=key, chunk_bytes=1)))
    assert len(chunks) == 1 and chunks[0].total_bytes == len(chunks[0].data) > 0
    assert health(address) == "SERVING"
    assert wire.stats_from_pb(s.GetStats(pb.GetStatsRequest()))["errors"] >= 7


def _spawn_raw(args: list[str]) -> tuple[subprocess.Popen[str], str, list[str]]:
    """Starts a worker and returns as soon as it is bound (its 'listening on' log line), before it is ready."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "expert_workers", "serve", *args, "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(r"listening on (\S+:\d+)", line):
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
            return proc, m.group(1), lines
    raise AssertionError(f"worker exited ({proc.wait()}):\n{''.join(lines)}")


def test_worker_is_unavailable_until_loaded_then_serves(tiny_ckpt: Path, tmp_path: Path) -> None:
    gate = tmp_path / "hold"
    gate.touch()
    proc, address, lines = _spawn_raw(["--model", str(tiny_ckpt), "--shard", "0/1", "--expert-bits", "16",
                                       "--no-progress",
                                       "--inject-hold-load-while", str(gate)])
    try:
        s, pb = stub(address), wire.pb
        assert health(address) == "NOT_SERVING"
        info = s.GetInfo(pb.GetInfoRequest(), timeout=5)
        assert not info.ready and len(info.experts) == 32 and info.bits == 16
        with pytest.raises(grpc.RpcError) as e:
            list(s.FetchExpert(pb.FetchExpertRequest(key=pb.ExpertKey(layer=0, expert=0)), timeout=5))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "still loading" in (e.value.details() or "")
        with RemoteSource([address], timeout_s=5) as source, pytest.raises(ExpertUnavailable, match="UNAVAILABLE"):
            source.fetch_into(ExpertKey(0, 0), torch.empty(1 << 16, dtype=torch.uint8))
        gate.unlink()
        while not any("serving on" in ln for ln in lines):
            assert proc.poll() is None, "".join(lines)
            threading.Event().wait(0.1)
        assert f"expert worker serving on {address}\n" in lines
        assert health(address) == "SERVING" and s.GetInfo(pb.GetInfoRequest(), timeout=5).ready
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_cache_reused_on_restart_and_corrupt_cache_rebuilt(tiny_ckpt: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ["expert_workers", "serve", "--model", str(tiny_ckpt), "--shard", "1/4", "--port", "0",
            "--cache-dir", str(cache), "--no-progress"]

    def run() -> tuple[dict[ExpertKey, bytes], dict[str, float], str]:
        server = start_server(args)
        try:
            s = stub(server.address)
            keys = wire.info_from_pb(s.GetInfo(wire.info_request(), timeout=10)).experts
            data = {k: b"".join(c.data for c in s.FetchExpert(wire.fetch_request(k), timeout=10)) for k in keys}
            stats = wire.stats_from_pb(s.GetStats(wire.stats_request(), timeout=10))
        finally:
            assert server.stop() == 0
        return data, stats, "".join(server.lines)

    first, stats, log = run()
    assert len(first) == 8 and stats["quantized_experts"] == 8 and "cache miss: no cache yet" in log
    again, stats, log = run()
    assert again == first and stats["quantized_experts"] == 0 and stats["cache_reused"] == 1
    assert "reusing quantized cache" in log and "quantizing" not in log
    data_file = next(cache.glob("*/shard-1of4.data"))
    raw = bytearray(data_file.read_bytes())
    raw[100] ^= 0x55  # inside the first expert
    data_file.write_bytes(raw)
    repaired, stats, log = run()
    assert repaired == first and stats["quantized_experts"] == 1 and stats["cache_repaired_experts"] == 1
    assert "is corrupt: 1 experts fail their checksum (L0E1)" in log


def test_failover_on_corruption_delay_and_death(tiny_ckpt: Path) -> None:
    """Three replicas of one shard: one corrupts every payload, one answers too slowly, one is healthy."""
    base = ["expert_workers", "serve", "--model", str(tiny_ckpt), "--shard", "0/1", "--port", "0", "--no-progress"]
    servers = start_parallel([[*base, *extra] for extra in
                              (["--inject-corrupt-every", "1"], ["--inject-delay-ms", "3000"], [])])
    good = servers[2:]
    try:
        source = RemoteSource([s.address for s in servers], prefer_zero_copy=False, timeout_s=1.0, cooldown_s=0)
        reference = RemoteSource([good[0].address], prefer_zero_copy=False)
        out, ref = torch.empty(1 << 16, dtype=torch.uint8), torch.empty(1 << 16, dtype=torch.uint8)
        keys = source.layout().all_keys()
        for key in keys[:6]:
            m = source.fetch_into(key, out)
            reference.fetch_into(key, ref)
            assert torch.equal(out[:m.nbytes], ref[:m.nbytes]), key
        st = source.stats()
        assert st["checksum_failures"] >= 1 and st["rpc_errors"] >= 1 and st["failovers"] >= 2
        assert st["fetches"] == 6 and st["unavailable"] == 0
        good[0].proc.kill()
        good[0].proc.wait()
        with pytest.raises(ExpertUnavailable) as e:
            source.fetch_into(keys[7], out)
        assert all(code in str(e.value) for code in ("DATA_LOSS", "DEADLINE_EXCEEDED", "UNAVAILABLE")), e.value
        with pytest.raises(ExpertNotFound):
            source.fetch_into(ExpertKey(50, 0), out)
        source.close()
        reference.close()
    finally:
        for s in servers:
            s.stop()


def test_sigterm_unlinks_shared_memory_and_exits_cleanly(tiny_ckpt: Path) -> None:
    server = spawn_workers(tiny_ckpt, 1, ["--no-progress"])[0]
    with RemoteSource([server.address]) as source:
        handle = wire.handle_from_pb(stub(server.address).GetExpertHandle(wire.handle_request(ExpertKey(0, 0))))
        assert Path("/dev/shm", handle.shm_name).exists()
        view = source.host_view(ExpertKey(0, 0))
        assert view is not None
        assert server.stop(signal.SIGTERM) == 0
        assert not Path("/dev/shm", handle.shm_name).exists()
        assert view.sum().item() > 0  # our mapping outlives the worker's unlink


def _serve_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "expert_workers", "serve", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_mismatched_workers_and_bad_cli_arguments(tiny_ckpt: Path, tiny_workers: list[ServerProcess],
                                                  tmp_path: Path) -> None:
    not_mixtral = tmp_path / "llama"
    not_mixtral.mkdir()
    (not_mixtral / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases = ([["--shard", "3/3"], "shard 3/3 is invalid"],
             [["--group-size", "12"], "group size must be a positive multiple of 8"],
             [["--model", str(not_mixtral)], "model_type is 'llama'"])
    # The bad command lines run meanwhile: each spends seconds importing before it can refuse its arguments.
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        refused = pool.map(_serve_cli, [["--model", str(tiny_ckpt), "--port", "0", *bad] for bad, _ in cases])
        exact = spawn_workers(tiny_ckpt, 1, ["--expert-bits", "16", "--no-progress"])
        meta8 = spawn_workers(tiny_ckpt, 1, ["--meta-bits", "8", "--no-progress"])
        try:
            with pytest.raises(ValueError, match="expert workers disagree.*at 2 bits g64.*at 16 bits"):
                RemoteSource([tiny_workers[0].address, exact[0].address])
            with pytest.raises(ValueError, match=r"disagree.*at 2 bits g64 \(.*at 2 bits g64 \(8-bit meta\)"):
                RemoteSource([tiny_workers[0].address, meta8[0].address])
            with RemoteSource([meta8[0].address]) as source:   # the 8-bit tables travel and decode
                key = ExpertKey(1, 3)
                out = torch.empty(source.manifest(key).nbytes, dtype=torch.uint8)
                manifest = source.fetch_into(key, out)
                assert manifest.version == 2 and manifest.matrices["w2"].meta_bits == 8
                with RemoteSource([w.address for w in tiny_workers]) as fp16:
                    ref = torch.empty(fp16.manifest(key).nbytes, dtype=torch.uint8)
                    fp16_manifest = fp16.fetch_into(key, ref)
                    for m in ("w1", "w3", "w2"):   # within the tables' half step of the fp16-meta weights
                        a = dequantize_matrix(out, manifest, m).float()
                        b = dequantize_matrix(ref, fp16_manifest, m).float()
                        assert 0 < float((a - b).norm() / b.norm()) < 0.02, m
        finally:
            stop_all(exact + meta8)
        with pytest.raises(ExpertUnavailable, match="did not answer GetInfo"):
            RemoteSource(["127.0.0.1:1"], connect_timeout_s=0.5)
        for (_, message), r in zip(cases, refused):
            assert r.returncode == 2 and message in r.stderr, r.stderr
    shutil.rmtree(not_mixtral)


def test_server_process_reports_a_server_that_never_serves(tmp_path: Path) -> None:
    """``ServerProcess.start``, how the tests and benchmarks start every server: a process that exits before
    serving raises at once with its own error line (also in the log file it was given); one that neither serves
    nor exits raises TimeoutError and is killed."""
    log = tmp_path / "worker.log"
    with pytest.raises(RuntimeError, match=r"exited \(2\) before serving:\n.*neither a checkpoint directory"):
        ServerProcess.start(["expert_workers", "serve", "--model", str(tmp_path / "missing"), "--shard", "0/1",
                             "--port", "0"], timeout=120, log_path=log)
    assert "neither a checkpoint directory" in log.read_text()
    started: list[ServerProcess] = []

    class Kept(ServerProcess):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            started.append(self)

    with pytest.raises(TimeoutError, match="not ready in 1s"):
        Kept.start(["timeit", "-n", "1", "import time; time.sleep(60)"], timeout=1)
    assert started[0].proc.poll() is not None  # killed, not left running
