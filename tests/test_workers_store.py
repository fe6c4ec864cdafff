"""ExpertStore, its disk cache and InProcessSource: checkpoint layouts, sharding, bit-exactness, cache reuse
and repair. In-process (no servers): the gRPC and Ray shells are tested in test_workers_grpc / test_worker_ray."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from expert_workers.cache import CacheIndex
from expert_workers.checkpoint import Checkpoint, CheckpointError
from expert_workers.format import (EXACT, INT2, INT2_M8, INT3, INT3_M8, INT4, ExpertKey, ExpertManifest, QuantSpec,
                                   checksum, dequantize_matrix, meta8_nbytes, pack_expert)
from expert_workers.meta8 import decode_meta8, encode_meta8
from expert_workers.inprocess import InProcessSource
from expert_workers.source import ExpertNotFound, make_source
from expert_workers.store import ExpertStore, ShardSpec, WorkerNotReady


def hqq_reference(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """hqq's own quantize -> dequantize of one matrix, scale/zero stored as fp16 like format.py does (at 8 meta
    bits, as the fp16 table entries their codes pick)."""
    from hqq.core.quantize import Quantizer

    w_q, meta = Quantizer.quantize(weight, nbits=spec.bits, group_size=spec.group_size, axis=1, optimize=True,
                                   device="cpu")
    scale, zero = meta["scale"].half(), meta["zero"].half()
    if spec.meta8:
        scale = decode_meta8(encode_meta8(scale, torch.float16, log=True), torch.float16)
        zero = decode_meta8(encode_meta8(zero, torch.float16, log=False), torch.float16)
    return Quantizer.dequantize(w_q, meta | {"scale": scale, "zero": zero})


def write_fused(src: Path, dst: Path, files: int = 5) -> Path:
    """Rewrites a Mixtral-layout checkpoint into transformers 5's fused layout (gate_up_proj [E, 2I, H],
    down_proj [E, H, I]), spread over ``files`` safetensors files with an index."""
    config = json.loads((src / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in src.glob("*.safetensors"):
        tensors |= load_file(f)
    out: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        pre = f"model.layers.{layer}.block_sparse_moe"
        experts = range(config["num_local_experts"])
        w = {m: torch.stack([tensors.pop(f"{pre}.experts.{e}.{m}.weight") for e in experts]) for m in ("w1", "w2", "w3")}
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1).contiguous()
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = w["w2"].contiguous()
    out |= {n.replace(".block_sparse_moe.gate.", ".mlp.gate."): t for n, t in tensors.items()}
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    names = sorted(out)
    weight_map = {}
    for i in range(files):
        fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = {n: out[n] for n in names[i::files]}
        save_file(part, dst / fname, metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def fused_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fused(tiny_ckpt, tmp_path_factory.mktemp("fused") / "ckpt")


def test_checkpoint_reads_both_layouts_identically(tiny_ckpt: Path, fused_ckpt: Path) -> None:
    plain, fused = Checkpoint(tiny_ckpt), Checkpoint(fused_ckpt)
    assert plain.layout == fused.layout and len(fused.files) == 5
    assert fused.is_fused(0) and not plain.is_fused(0)
    keys = plain.layout.all_keys()
    for (k1, a), (k2, b) in zip(plain.iter_experts(keys), fused.iter_experts(keys), strict=True):
        assert k1 == k2
        for m in ("w1", "w3", "w2"):
            assert torch.equal(a[m], b[m]), (k1, m)
    assert a["w1"].shape == (plain.layout.intermediate_size, plain.layout.hidden_size)
    assert a["w2"].shape == (plain.layout.hidden_size, plain.layout.intermediate_size)


def test_checkpoint_errors_name_the_problem(tiny_ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        Checkpoint(bad)
    (bad / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"experts\.0\.w1\.weight' has shape \[128, 64\], expected \[96, 64\]"):
        Checkpoint(bad).read_expert(ExpertKey(0, 0))
    (bad / "config.json").write_text(json.dumps(config))
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.2.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.5\.w3\.weight' for expert L2E5 is missing"):
        Checkpoint(bad).read_expert(ExpertKey(2, 5))
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)


def test_shards_cover_every_expert_exactly_once(tiny_ckpt: Path) -> None:
    layout = Checkpoint(tiny_ckpt).layout
    for n in (1, 3, 5):
        owned = [k for i in range(n) for k in ShardSpec(i, n).keys(layout)]
        assert sorted(owned) == layout.all_keys()
    assert ShardSpec.parse("2/3") == ShardSpec(2, 3)
    for text in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError):
            ShardSpec.parse(text)


@pytest.mark.parametrize("spec", [INT2, INT3, INT4, INT2_M8, INT3_M8], ids=["int2", "int3", "int4", "int2m8", "int3m8"])
def test_quantized_experts_dequantize_bit_identically_to_hqq(tiny_ckpt: Path, tmp_path: Path, spec: QuantSpec) -> None:
    ckpt = Checkpoint(tiny_ckpt)
    stores = [ExpertStore(ckpt, f"{i}/3", spec, cache_dir=tmp_path, progress=False).load() for i in range(3)]
    try:
        source = make_source(stores=stores)
        out = torch.empty(max(s.manifest(k).nbytes for s in stores for k in s.keys()), dtype=torch.uint8)
        for key, weights in ckpt.iter_experts(ckpt.layout.all_keys()):
            manifest = source.fetch_into(key, out)
            view = source.host_view(key)
            assert view is not None and torch.equal(view, out[:manifest.nbytes])
            for m in ("w1", "w3", "w2"):
                ref = hqq_reference(weights[m], spec)
                assert torch.equal(dequantize_matrix(out, manifest, m), ref), (key, m)
                assert torch.equal(dequantize_matrix(view, manifest, m), ref), (key, m)
        assert source.stats()["fetches"] == 32 and source.stats()["checksum_failures"] == 0
    finally:
        for s in stores:
            s.close()


def test_meta8_tables_bound_the_error_and_shrink_the_expert() -> None:
    """8-bit scale/zero tables: every value within half a table step (relative, in the log domain, for scales)
    even with outlier groups; the tensors are table + one byte a group; a 2-bit g64 expert shrinks by 2.5 → 2.25
    bits a weight (here: the exact bytes of codes, tables and fp16 meta); the manifest says so (version 2) and
    survives msgpack; an unknown version is refused."""
    from hqq.core.quantize import Quantizer

    torch.manual_seed(0)
    w = torch.randn(512, 1024) / 32
    w[::37, ::11] *= 25                                                        # outlier groups
    _, meta = Quantizer.quantize(w, nbits=2, group_size=64, axis=1, optimize=False, device="cpu")
    for values, log in ((meta["scale"].half(), True), (meta["zero"].half(), False)):
        packed = encode_meta8(values, torch.float16, log)
        assert packed.dtype == torch.uint8 and packed.numel() == 512 + values.numel()
        got, ref = decode_meta8(packed, torch.float16).float(), values.float()
        assert got.shape == ref.shape
        if log:   # in log units; the table's fp16 rounding adds up to 2^-11 of a value, 2^-11 in log units
            step = float(ref.max().log() - ref.min().log()) / 255
            err, rounding = (got.log() - ref.log()).abs().max().item(), 2 ** -11
        else:
            step = float(ref.max() - ref.min()) / 255
            err, rounding = (got - ref).abs().max().item(), 2 ** -11 * float(ref.abs().max())
        assert 0 < err <= step / 2 + rounding, (log, err, step)
    zeros = torch.rand(4096) * 3
    zeros[7] = -150.0                    # one group all of one sign: hqq's zero far outside [0, 3]
    got = decode_meta8(encode_meta8(zeros.half(), torch.float16, log=False), torch.float16).flatten().float()
    assert got[7] == -150.0                                            # the extremes stay exact
    xs = zeros.half().float().sort().values
    central = float(xs[4090] - xs[4]) / 239          # the TAIL_QUANTILE quantiles of 4096, 8 points a tail
    assert float((got - zeros.half().float()).abs().max()) <= central / 2 + 2 ** -11 * 3   # the rest: 240 points
    with pytest.raises(ValueError, match="positive, finite scales"):
        encode_meta8(torch.tensor([0.5, 0.0]), torch.float16, log=True)
    weights = {"w1": torch.randn(256, 512), "w3": torch.randn(256, 512), "w2": torch.randn(512, 256)}
    _, m16 = pack_expert(ExpertKey(0, 0), weights, INT2)
    buf, m8 = pack_expert(ExpertKey(0, 0), weights, INT2_M8)
    assert (m16.version, m8.version) == (1, 2) and m8.matrices["w1"].meta_bits == 8
    groups, codes = 256 * 512 // 64, 3 * 256 * 512 // 4                       # per matrix; 2-bit codes of all three
    assert (m16.nbytes, m8.nbytes) == (codes + 6 * 2 * groups, codes + 6 * (512 + groups))  # Mixtral: 2.5 → 2.25 bits
    assert meta8_nbytes(m16) == meta8_nbytes(m8) == m8.nbytes        # what a coordinator's hint predicts
    _, m3 = pack_expert(ExpertKey(0, 0), weights, INT3)
    assert meta8_nbytes(m3) == pack_expert(ExpertKey(0, 0), weights, INT3_M8)[1].nbytes  # the planes keep their place
    again = ExpertManifest.from_msgpack(m8.to_msgpack())
    assert again == m8 and torch.equal(dequantize_matrix(torch.from_numpy(buf), again, "w2"),
                                       dequantize_matrix(torch.from_numpy(buf), m8, "w2"))
    import msgpack

    d = msgpack.unpackb(m8.to_msgpack())
    with pytest.raises(ValueError, match="manifest version 3, this code reads 1 and 2"):
        ExpertManifest.from_msgpack(msgpack.packb(d | {"version": 3}))
    with pytest.raises(ValueError, match="version 1 with 8-bit meta tables"):
        ExpertManifest.from_msgpack(msgpack.packb(d | {"version": 1}))
    d["matrices"]["w3"]["tensors"]["zero"]["nbytes"] -= 1
    with pytest.raises(ValueError, match="w3: zero is 2559 bytes of uint8, 8-bit meta needs 2560"):
        ExpertManifest.from_msgpack(msgpack.packb(d))
    d["matrices"]["w3"]["meta_bits"] = 7
    with pytest.raises(ValueError, match="w3: meta bits 7"):
        ExpertManifest.from_msgpack(msgpack.packb(d))
    with pytest.raises(ValueError, match="meta bits must be one of"):
        QuantSpec(bits=2, meta_bits=4)
    assert INT2.as_dict() == {"bits": 2, "group_size": 64, "compute_dtype": "float16"}  # fp16 caches keep their key
    assert INT2_M8.as_dict()["meta_bits"] == 8 and INT2_M8.label == "2 bits g64 (8-bit meta)"
    assert QuantSpec(bits=16, meta_bits=8) == EXACT       # nothing to store at 16 bits: such workers agree


def test_bits16_is_the_checkpoint_bit_for_bit_in_both_layouts(tiny_ckpt: Path, fused_ckpt: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint(tiny_ckpt)
    for path in (tiny_ckpt, fused_ckpt):
        with ExpertStore(path, "0/2", EXACT, cache_dir=tmp_path, progress=False) as a, \
                ExpertStore(path, "1/2", EXACT, cache_dir=tmp_path, progress=False) as b:
            source = InProcessSource([a.load(), b.load()])
            for key, weights in ckpt.iter_experts(ckpt.layout.all_keys()):
                view = source.host_view(key)
                assert view is not None
                for m in ("w1", "w3", "w2"):
                    got = dequantize_matrix(view, source.manifest(key), m)
                    assert got.dtype == weights[m].dtype and torch.equal(got, weights[m]), (path, key, m)


def test_fused_sharded_checkpoint_quantizes_to_the_same_bytes(tiny_ckpt: Path, fused_ckpt: Path, tmp_path: Path) -> None:
    with ExpertStore(tiny_ckpt, "1/4", INT2, cache_dir=tmp_path, progress=False) as a, \
            ExpertStore(fused_ckpt, "1/4", INT2, cache_dir=tmp_path, progress=False) as b:
        a.load(), b.load()
        assert a.keys() == b.keys()
        for key in a.keys():
            assert np.array_equal(a.buffer(key), b.buffer(key)), key


def test_store_api_and_errors(tiny_ckpt: Path, tmp_path: Path) -> None:
    store = ExpertStore(tiny_ckpt, "1/3", INT2, cache_dir=tmp_path, progress=False)
    key = store.keys()[0]
    assert not store.ready and not store.info().ready
    with pytest.raises(WorkerNotReady):
        store.buffer(key)
    store.load()
    try:
        info = store.info()
        assert info.ready and info.shard == ShardSpec(1, 3) and info.experts == tuple(store.keys())
        assert info.bytes_held == sum(store.manifest(k).nbytes for k in store.keys()) > 0
        with pytest.raises(ExpertNotFound, match="not in shard 1/3"):
            store.manifest(ExpertKey(0, 0))
        with pytest.raises(ExpertNotFound, match="does not exist"):
            store.buffer(ExpertKey(4, 0))
        h = store.handle(key)
        assert h.shm_name.startswith(f"moe-{store.fingerprint[:8]}-s1of3-{os.getpid()}")
        assert h.offset % 4096 == 0 and h.length == store.manifest(key).nbytes
        assert Path("/dev/shm", h.shm_name).exists()
        data = b"".join(bytes(piece) for _, piece in store.chunks(key, 1000))
        assert data == store.buffer(key).tobytes() and checksum(data) == h.manifest.checksum
        assert store.stats()["fetches"] == 1 and store.stats()["bytes_sent"] == len(data)
    finally:
        store.close()
    assert not Path("/dev/shm", h.shm_name).exists()


def _store_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "expert_workers.store")


def test_cache_is_reused_invalidated_and_repaired(tiny_ckpt: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="expert_workers.store")
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt_dir)
    cache = tmp_path / "cache"

    def start(spec: QuantSpec = INT2) -> tuple[dict[ExpertKey, bytes], dict[str, float]]:
        caplog.clear()
        with ExpertStore(ckpt_dir, "0/2", spec, cache_dir=cache, progress=False) as s:
            s.load()
            return {k: s.buffer(k).tobytes() for k in s.keys()}, s.stats()

    first, stats = start()
    assert stats["quantized_experts"] == 16 and stats["cache_reused"] == 0 and "cache miss: no cache yet" in _store_log(caplog)
    again, stats = start()
    assert again == first and stats["quantized_experts"] == 0 and stats["cache_reused"] == 1
    assert "reusing quantized cache" in _store_log(caplog)

    data_file = next(cache.glob("*/shard-0of2.data"))
    index = CacheIndex.from_msgpack(next(cache.glob("*/shard-0of2.msgpack")).read_bytes())
    raw = bytearray(data_file.read_bytes())
    raw[index.entries[ExpertKey(2, 4)].offset + 100] ^= 0xFF  # one flipped byte in one expert
    data_file.write_bytes(raw)
    repaired, stats = start()
    assert repaired == first and stats["quantized_experts"] == 1 and stats["cache_repaired_experts"] == 1
    assert "is corrupt: 1 experts fail their checksum" in _store_log(caplog)
    assert start()[1]["quantized_experts"] == 0  # the repair was written back

    cut = index.entries[ExpertKey(0, 2)].offset + 10  # truncated: every expert but the first is lost
    data_file.write_bytes(data_file.read_bytes()[:cut])
    repaired, stats = start()
    assert repaired == first and stats["quantized_experts"] == 15 and stats["cache_repaired_experts"] == 15

    next(cache.glob("*/shard-0of2.msgpack")).write_bytes(b"\x93garbage")
    assert start()[1]["quantized_experts"] == 16 and "unreadable cache manifest" in _store_log(caplog)

    other, stats = start(QuantSpec(bits=2, group_size=32))  # a new setting is a separate cache
    assert stats["quantized_experts"] == 16 and other != first
    assert start()[1]["quantized_experts"] == 0

    st = os.stat(ckpt_dir / "model.safetensors")  # weights rewritten in place (same shapes, new mtime)
    os.utime(ckpt_dir / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert start()[1]["quantized_experts"] == 16 and "checkpoint files changed" in _store_log(caplog)


def test_inprocess_source_checks_coverage_and_fails_over(tiny_ckpt: Path, tmp_path: Path) -> None:
    a = ExpertStore(tiny_ckpt, "0/2", INT2, cache_dir=tmp_path, progress=False).load()
    b = ExpertStore(tiny_ckpt, "1/2", INT2, cache_dir=tmp_path, progress=False).load()
    a2 = ExpertStore(tiny_ckpt, "0/2", INT2, cache_dir=tmp_path, progress=False).load()
    try:
        with pytest.raises(ValueError, match="do not cover 16 experts"):
            InProcessSource([a])
        source = InProcessSource([a, b, a2])
        key = a.keys()[3]
        a.buffer(key)[5] ^= 1  # corrupt the first replica's copy in shared memory
        out = torch.empty(a.manifest(key).nbytes, dtype=torch.uint8)
        source.fetch_into(key, out)
        assert torch.equal(out, torch.from_numpy(a2.buffer(key).copy()))
        assert source.stats()["checksum_failures"] == 1 and source.stats()["failovers"] == 1
        with pytest.raises(ExpertNotFound):
            source.fetch_into(ExpertKey(9, 9), out)
        assert source.layout().num_layers == 4
    finally:
        for s in (a, b, a2):
            s.close()
