"""The packed expert format: one contiguous byte buffer per expert, described by a msgpack manifest.

An expert is the three matrices of a Mixtral FFN, ``y = w2 · (silu(w1 · x) * (w3 · x))``:

    w1: [I, H]   gate projection        (I = intermediate size, H = hidden size)
    w3: [I, H]   up projection
    w2: [H, I]   down projection

Each matrix is either hqq-quantized (bits 2/3/4/8, grouped along the input axis, ``axis=1``, the layout
gemlite's ``A16Wn`` consumes) and stored as three tensors ``W_q`` (packed integers), ``scale`` and
``zero`` (fp16; or, at ``QuantSpec.meta_bits`` 8, a 256-entry table followed by a one-byte code a group),
or kept as is (bits 16) as one tensor ``weight``. 3-bit codes are repacked as two planes
(``PLANES3``: the low 2 bits in hqq's "2bit_u8" packing as ``W_q``, the high bit in its "1bit_u8" packing as
``W_qh``): hqq's own "3bit_32" puts ten codes in a word from group rows a tenth of the matrix apart, which no
GEMV tile can read row-locally, and it spends 3.2 bits per code where the planes spend 3. All tensors of one expert live in one
buffer at 256-byte aligned offsets, so moving an expert is one copy and every tensor is a zero-copy view.

The workers own this format; the coordinator only reads manifests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import msgpack
import numpy as np
import torch
import xxhash

from expert_workers.meta8 import LUT_ENTRIES, META8_TABLE, decode_meta8, encode_meta8


def _import_hqq_compiling_lazily() -> None:
    """Imports ``hqq.core.quantize`` with its ``@torch.compile()`` methods wrapped on first call instead of at
    import time, for methods we never call (torch.compile compiles on the first call either way). Wrapping
    imports torch._dynamo and torch._inductor: measured on 2 cores, a quantizing expert worker's imports took
    9 s instead of 4, the coordinator's 12 s instead of 10 (transformers' cache_utils imports hqq whenever it
    is installed). Runs when this module is imported, before anything else imports hqq."""
    import functools
    import importlib

    eager = torch.compile

    def lazy(model: Any = None, **options: Any) -> Any:
        if model is None:  # the decorator form, @torch.compile(...)
            return lambda fn: lazy(fn, **options)
        compiled: list[Any] = []

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not compiled:
                compiled.append(eager(model, **options))
            return compiled[0](*args, **kwargs)
        return call

    torch.compile = lazy  # type: ignore[assignment]
    try:
        importlib.import_module("hqq.core.quantize")  # later imports of it find it in sys.modules
    except ImportError:  # not installed: the functions below say so when they need it
        pass
    finally:
        torch.compile = eager  # type: ignore[assignment]


_import_hqq_compiling_lazily()

FORMAT_VERSION = 1
ALIGN = 256
MATRICES = ("w1", "w3", "w2")
QUANT_BITS = (2, 3, 4, 8)
ALL_BITS = QUANT_BITS + (16,)
META_BITS = (16, 8)
PLANES3 = "3bit_planes_u8"
"""Packing name of 3-bit codes stored as a 2-bit plane (``W_q``) and a 1-bit plane (``W_qh``)."""
META8_VERSION = 2
"""Manifest version of an expert whose scales and zeros are 8-bit codes (``meta_bits`` 8): a reader of version 1
refuses it with a clear error instead of misreading the codes as fp16."""
PACKING_REVISION = "3bit-planes"
"""Names a packing change made without a manifest schema change (3-bit as PLANES3): part of the on-disk cache
key of the bit widths it affects, so caches written before it are quantized again, not misread."""

_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8, "int32": torch.int32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "float32": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16``; a clear error for anything else."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True, order=True)
class ExpertKey:
    """Identifies one expert of the model."""

    layer: int
    """Decoder layer index, 0-based."""
    expert: int
    """Expert index within the layer, 0-based."""

    def __str__(self) -> str:
        return f"L{self.layer}E{self.expert}"


@dataclass(frozen=True)
class QuantSpec:
    """How experts are quantized. hqq 0.2.8 keeps scales and zeros in fp16, so smaller groups cost bits:
    measured on a 14336x4096 matrix, 2-bit g16 is 4.0 bits/weight (relative error 0.30), 2-bit g64 2.5
    bits (0.43), 3-bit g64 3.7 bits (0.18), 4-bit g64 4.5 bits (0.09). g64 is the default: it is the
    size/error knee and the group size gemlite's kernels are tuned for."""

    bits: int = 2
    """2, 3, 4 or 8 (hqq), or 16 for the checkpoint's weights unchanged (exact mode)."""
    group_size: int = 64
    """Weights per (scale, zero) pair, along the input dimension. Ignored for bits 16."""
    compute_dtype: str = "float16"
    """Dtype of scale/zero and of dequantized weights."""
    meta_bits: int = 16
    """16: scale and zero stored in ``compute_dtype``, as hqq keeps them. 8: each is a one-byte code into a
    256-entry table of its matrix (``encode_meta8``), so a 2-bit g64 expert costs 2.25 bits a weight instead of
    2.5 (3-bit g64: 3.25 instead of 3.5) and moves 10% (7%) fewer bytes. The two tables cost 1 KiB a matrix
    (fp16), so it pays for matrices of more than 512 groups. Ignored for bits 16."""

    def __post_init__(self) -> None:
        if self.bits not in ALL_BITS:
            raise ValueError(f"expert bits must be one of {ALL_BITS}, got {self.bits}")
        if self.bits != 16 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"group size must be a positive multiple of 8, got {self.group_size}")
        if self.meta_bits not in META_BITS:
            raise ValueError(f"meta bits must be one of {META_BITS}, got {self.meta_bits}")
        if self.bits == 16:  # nothing to store: 16-bit workers started with or without --meta-bits 8 agree
            object.__setattr__(self, "meta_bits", 16)

    @property
    def meta8(self) -> bool:
        """Whether scales and zeros are stored as 8-bit table codes."""
        return self.meta_bits == 8  # __post_init__ keeps 16 at bits 16

    @property
    def label(self) -> str:
        """For messages: "2 bits g64", "2 bits g64 (8-bit meta)", "16 bits"."""
        if self.bits == 16:
            return "16 bits"
        return f"{self.bits} bits g{self.group_size}" + (" (8-bit meta)" if self.meta8 else "")

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size, "compute_dtype": self.compute_dtype}
        if self.meta8:  # only then: the on-disk cache key of fp16 meta stays what it was
            d["meta_bits"], d["meta_table"] = 8, META8_TABLE
        return d


EXACT = QuantSpec(bits=16)
INT2 = QuantSpec(bits=2, group_size=64)
INT3 = QuantSpec(bits=3, group_size=64)
INT4 = QuantSpec(bits=4, group_size=64)
INT2_M8 = QuantSpec(bits=2, group_size=64, meta_bits=8)
INT3_M8 = QuantSpec(bits=3, group_size=64, meta_bits=8)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in an expert's buffer."""

    offset: int
    """Byte offset from the start of the expert buffer (a multiple of ALIGN)."""
    nbytes: int
    """Length in bytes."""
    shape: tuple[int, ...]
    """Tensor shape."""
    dtype: str
    """Torch dtype name, e.g. "uint8", "float16"."""


@dataclass(frozen=True)
class MatrixEntry:
    """One of w1/w3/w2: its logical shape, how it is quantized and its stored tensors."""

    shape: tuple[int, int]
    """Logical [out, in] shape of the weight."""
    bits: int
    """Quantization bits, 16 = stored unquantized as tensor "weight"."""
    group_size: int
    """hqq group size (0 for bits 16)."""
    packing: str
    """hqq packing name ("2bit_u8", "4bit_u8", ...), PLANES3 for 3 bits, "" for bits 16."""
    compute_dtype: str
    """Dtype hqq dequantizes into."""
    tensors: Mapping[str, TensorEntry]
    """"W_q", "scale", "zero" (quantized; PLANES3 adds "W_qh") or "weight" (bits 16)."""
    meta_bits: int = 16
    """16: "scale" and "zero" are ``compute_dtype`` [groups, 1]; 8: each is uint8, a table then codes
    (``encode_meta8``)."""

    @property
    def groups(self) -> int:
        """Quantization groups of the matrix: one scale and one zero each."""
        return self.shape[0] * self.shape[1] // self.group_size


@dataclass(frozen=True)
class ExpertManifest:
    """Describes one packed expert buffer. Serialized with msgpack; travels with every fetch."""

    key: ExpertKey
    """Which expert."""
    nbytes: int
    """Total buffer length."""
    checksum: int
    """xxh3_64 of the whole buffer."""
    matrices: Mapping[str, MatrixEntry]
    """"w1", "w3", "w2"."""
    fingerprint: str = ""
    """Fingerprint of the source checkpoint and quantization settings."""
    version: int = FORMAT_VERSION
    """Format version."""

    def to_msgpack(self) -> bytes:
        mats = {
            name: {"shape": list(m.shape), "bits": m.bits, "group_size": m.group_size, "packing": m.packing,
                   "compute_dtype": m.compute_dtype, "meta_bits": m.meta_bits,
                   "tensors": {t: {"offset": e.offset, "nbytes": e.nbytes, "shape": list(e.shape),
                                   "dtype": e.dtype} for t, e in m.tensors.items()}}
            for name, m in self.matrices.items()
        }
        return msgpack.packb({"version": self.version, "layer": self.key.layer, "expert": self.key.expert,
                              "nbytes": self.nbytes, "checksum": self.checksum,
                              "fingerprint": self.fingerprint, "matrices": mats})

    @classmethod
    def from_msgpack(cls, data: bytes) -> ExpertManifest:
        try:
            d = msgpack.unpackb(data)
            if d["version"] not in (FORMAT_VERSION, META8_VERSION):
                raise ValueError(f"manifest version {d['version']}, this code reads {FORMAT_VERSION} and "
                                 f"{META8_VERSION}")
            mats = {
                name: MatrixEntry(
                    shape=tuple(m["shape"]), bits=m["bits"], group_size=m["group_size"], packing=m["packing"],
                    compute_dtype=m["compute_dtype"], meta_bits=m.get("meta_bits", 16),
                    tensors={t: TensorEntry(e["offset"], e["nbytes"], tuple(e["shape"]), e["dtype"])
                             for t, e in m["tensors"].items()})
                for name, m in d["matrices"].items()
            }
            _check_meta(mats, d["version"])
            return cls(key=ExpertKey(d["layer"], d["expert"]), nbytes=d["nbytes"], checksum=d["checksum"],
                       matrices=mats, fingerprint=d["fingerprint"], version=d["version"])
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as e:
            raise ValueError(f"malformed expert manifest: {e}") from e


def _check_meta(mats: Mapping[str, MatrixEntry], version: int) -> None:
    """A manifest from the wire describes its meta as the kernels will read it: meta bits 16 or 8, version 2
    exactly when some matrix has tables, and each table + codes tensor uint8 of the table's bytes + one a group."""
    tables = False
    for name, m in mats.items():
        if m.meta_bits not in META_BITS or (m.meta_bits == 8 and m.bits == 16):
            raise ValueError(f"matrix {name}: meta bits {m.meta_bits} at {m.bits} bits")
        if m.meta_bits == 16:
            continue
        tables = True
        if m.group_size <= 0:
            raise ValueError(f"matrix {name}: group size {m.group_size}")
        want = meta8_tensor_bytes(m)
        for t in ("scale", "zero"):
            e = m.tensors[t]
            if e.dtype != "uint8" or e.nbytes != want:
                raise ValueError(f"matrix {name}: {t} is {e.nbytes} bytes of {e.dtype}, 8-bit meta needs {want} "
                                 f"bytes of uint8")
    if tables != (version == META8_VERSION):
        raise ValueError(f"manifest version {version} with{'' if tables else 'out'} 8-bit meta tables")


def meta8_tensor_bytes(m: MatrixEntry) -> int:
    """Bytes of one 8-bit "scale" or "zero" tensor of ``m``: its table, then one code a group."""
    return LUT_ENTRIES * dtype_of(m.compute_dtype).itemsize + m.groups


def checksum(buf: np.ndarray | bytes | memoryview | torch.Tensor) -> int:
    """xxh3_64 of a byte buffer (a CPU uint8 tensor, numpy array, bytes or memoryview)."""
    if isinstance(buf, torch.Tensor):
        buf = buf.numpy()
    return xxhash.xxh3_64_intdigest(memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf)


def align(n: int) -> int:
    """``n`` rounded up to ALIGN: where a packed tensor starts, and a whole expert buffer's length."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _quantize_matrix(weight: torch.Tensor, spec: QuantSpec) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """hqq-quantizes one [out, in] weight; returns its stored tensors and matrix metadata."""
    if spec.bits == 16:
        return {"weight": weight.contiguous()}, {"bits": 16, "group_size": 0, "packing": "",
                                                 "compute_dtype": dtype_name(weight.dtype), "meta_bits": 16}
    from hqq.core.quantize import Quantizer

    if weight.shape[1] % spec.group_size:
        raise ValueError(f"input dim {weight.shape[1]} not divisible by group size {spec.group_size}")
    w_q, meta = Quantizer.quantize(weight, nbits=spec.bits, group_size=spec.group_size, axis=1,
                                   optimize=True, device=str(weight.device))
    cdt = dtype_of(spec.compute_dtype)
    scale, zero = meta["scale"].to(cdt).contiguous(), meta["zero"].to(cdt).contiguous()
    if spec.meta8:
        scale, zero = encode_meta8(scale, cdt, log=True), encode_meta8(zero, cdt, log=False)
    tensors = {"W_q": w_q.contiguous(), "scale": scale, "zero": zero}
    packing = meta["packing"]
    if spec.bits == 3:
        tensors |= _planes_of(w_q, meta["shape"][0] * meta["shape"][1] // spec.group_size)
        packing = PLANES3
    return tensors, {"bits": spec.bits, "group_size": spec.group_size, "packing": packing,
                     "compute_dtype": spec.compute_dtype, "meta_bits": 8 if spec.meta8 else 16}


def meta_of(m: MatrixEntry, views: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One quantized matrix's (scale, zero) as ``compute_dtype`` [groups, 1] tensors: views of the buffer
    at 16 meta bits, decoded copies at 8."""
    if m.meta_bits == 16:
        return views["scale"], views["zero"]
    cdt = dtype_of(m.compute_dtype)
    return decode_meta8(views["scale"], cdt), decode_meta8(views["zero"], cdt)


def _planes_of(w_q: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    """hqq's "3bit_32" words [ceil(R/10), g] as PLANES3: ``W_q`` [R'/4, g] and ``W_qh`` [R'/8, g] uint8, R' = R
    padded to a multiple of 8 with zero codes (R = group rows; no padding when the output dim is a multiple of
    8). Both planes use hqq's own packers, so row i of a plane holds group rows i + v·R'/V, as in "2bit_u8"."""
    from hqq.core.bitpack import BitPack

    codes = BitPack.unpack_3bit_32(w_q)[:rows]
    codes = torch.cat([codes, codes.new_zeros(((-rows) % 8, codes.shape[1]))])
    return {"W_q": BitPack.pack_2bit_u8(codes & 3).contiguous(), "W_qh": BitPack.pack_1bit_u8(codes >> 2).contiguous()}


def pack_expert(key: ExpertKey, weights: Mapping[str, torch.Tensor], spec: QuantSpec,
                fingerprint: str = "") -> tuple[np.ndarray, ExpertManifest]:
    """Quantizes w1/w3/w2 (CPU tensors, [out, in]) and packs them into one buffer + manifest."""
    parts: list[tuple[str, str, torch.Tensor]] = []
    metas: dict[str, dict[str, Any]] = {}
    for name in MATRICES:
        tensors, meta = _quantize_matrix(weights[name], spec)
        metas[name] = meta | {"shape": tuple(weights[name].shape)}
        parts += [(name, t, v.cpu()) for t, v in tensors.items()]
    entries: dict[str, dict[str, TensorEntry]] = {m: {} for m in MATRICES}
    offset = 0
    for name, t, v in parts:
        nbytes = v.numel() * v.element_size()
        entries[name][t] = TensorEntry(offset, nbytes, tuple(v.shape), dtype_name(v.dtype))
        offset = align(offset + nbytes)
    buf = np.zeros(offset, dtype=np.uint8)
    for name, t, v in parts:
        e = entries[name][t]
        buf[e.offset:e.offset + e.nbytes] = v.contiguous().view(torch.uint8).reshape(-1).numpy()
    mats = {m: MatrixEntry(shape=metas[m]["shape"], bits=metas[m]["bits"], group_size=metas[m]["group_size"],
                           packing=metas[m]["packing"], compute_dtype=metas[m]["compute_dtype"],
                           tensors=entries[m], meta_bits=metas[m]["meta_bits"]) for m in MATRICES}
    version = META8_VERSION if spec.meta8 else FORMAT_VERSION
    return buf, ExpertManifest(key=key, nbytes=offset, checksum=checksum(buf), matrices=mats,
                               fingerprint=fingerprint, version=version)


def meta8_nbytes(manifest: ExpertManifest) -> int:
    """The buffer length ``pack_expert`` would give the same expert with 8-bit scale/zero tables: each
    quantized matrix's fp16 scale and zero become a table plus one code a group (what a coordinator tells a
    user its budget would hold with ``--meta-bits 8``)."""
    offset = 0
    for name in MATRICES:
        m = manifest.matrices[name]
        for t, e in sorted(m.tensors.items(), key=lambda te: te[1].offset):
            offset = align(offset + (meta8_tensor_bytes(m) if m.bits != 16 and t in ("scale", "zero") else e.nbytes))
    return offset


def tensor_views(buf: torch.Tensor, manifest: ExpertManifest) -> dict[str, dict[str, torch.Tensor]]:
    """Zero-copy typed views of every stored tensor in a uint8 buffer (any device)."""
    if buf.dtype != torch.uint8 or buf.numel() < manifest.nbytes:
        raise ValueError(f"buffer of {buf.numel()} {buf.dtype} cannot hold expert {manifest.key} "
                         f"({manifest.nbytes} bytes)")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, m in manifest.matrices.items():
        out[name] = {t: buf[e.offset:e.offset + e.nbytes].view(dtype_of(e.dtype)).view(e.shape)
                     for t, e in m.tensors.items()}
    return out


def hqq_meta(m: MatrixEntry, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, Any]:
    """The meta dict hqq's Quantizer.dequantize (and HQQLinear / gemlite) expect for one matrix."""
    from hqq.core.quantize import Quantizer

    return {"nbits": m.bits, "group_size": m.group_size, "shape": torch.Size(m.shape), "scale": scale,
            "zero": zero, "axis": 1, "packing": m.packing, "view_as_float": False,
            "unpack_view_dtype": Quantizer.unpack_view_dtype[m.packing],
            "compute_dtype": dtype_of(m.compute_dtype)}


def dequantize_matrix(buf: torch.Tensor, manifest: ExpertManifest, name: str) -> torch.Tensor:
    """The [out, in] weight of matrix ``name``, dequantized by hqq exactly as hqq itself would."""
    return dequantize_views(manifest.matrices[name], tensor_views(buf, manifest)[name])


def dequantize_views(m: MatrixEntry, views: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``dequantize_matrix`` on one matrix's tensor views. PLANES3 codes are unpacked with hqq's unpackers
    and go through hqq's dequantize formula, so the weight is bit-identical to hqq's from "3bit_32"."""
    if m.bits == 16:
        return views["weight"]
    from hqq.core.quantize import Quantizer

    scale, zero = meta_of(m, views)
    if m.packing != PLANES3:
        return Quantizer.dequantize(views["W_q"], hqq_meta(m, scale, zero))
    from hqq.core.bitpack import BitPack

    cdt = dtype_of(m.compute_dtype)
    codes = BitPack.unpack_2bit_u8(views["W_q"], dtype=cdt) + 4 * BitPack.unpack_1bit_u8(views["W_qh"], dtype=cdt)
    codes = codes[:m.groups]
    return ((codes - zero) * scale).reshape(m.shape)


def quant_fingerprint(source_fingerprint: str, spec: QuantSpec) -> str:
    """Fingerprint of (checkpoint, quantization settings, format version): keys the on-disk cache."""
    key = f"{source_fingerprint}|{sorted(spec.as_dict().items())}|v{FORMAT_VERSION}"
    if spec.bits == 3:  # only 3-bit packing changed since v1: other caches stay valid
        key += f"|{PACKING_REVISION}"
    h = hashlib.sha256(key.encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ExpertLayout:
    """Shapes of one model's experts, what the coordinator needs to preallocate cache slots."""

    num_layers: int
    """Decoder layers."""
    num_experts: int
    """Experts per layer."""
    hidden_size: int
    """H."""
    intermediate_size: int
    """I."""
    top_k: int = 2
    """Experts routed per token."""

    def all_keys(self) -> list[ExpertKey]:
        return [ExpertKey(layer, e) for layer in range(self.num_layers) for e in range(self.num_experts)]
