"""The on-disk cache of one shard's quantized experts: one data file + one msgpack manifest file.

    $MOE_CACHE_DIR/experts/<quant_fingerprint>/shard-<I>of<N>.data       experts back to back, 4 KiB aligned
    $MOE_CACHE_DIR/experts/<quant_fingerprint>/shard-<I>of<N>.msgpack    CacheIndex (below)
    $MOE_CACHE_DIR/experts/<quant_fingerprint>/shard-<I>of<N>.lock       flock: one builder per shard per host

The data file has exactly the layout of the worker's shared-memory segment, so loading is one sequential read.
The manifest file is written last and atomically (rename), so a crash mid-build leaves no valid cache. Each
expert's manifest carries the xxh3 checksum of its bytes: a flipped or truncated data file is caught at load
time expert by expert, and only the damaged experts are re-quantized (``patch``).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from expert_workers.format import ExpertKey, ExpertManifest

CACHE_VERSION = 1
PAGE = 4096
"""Experts start on page boundaries: pinned-memory DMA and mmap slicing like page-aligned sources."""


def page_align(n: int) -> int:
    """``n`` rounded up to a multiple of PAGE."""
    return (n + PAGE - 1) // PAGE * PAGE


@dataclass(frozen=True)
class CacheEntry:
    """One expert inside the data file (and inside the shared-memory segment)."""

    offset: int
    """Byte offset of the expert in the data file / segment (a multiple of PAGE)."""
    manifest: ExpertManifest
    """Its manifest (length, checksum, tensors)."""


@dataclass(frozen=True)
class CacheIndex:
    """Contents of the manifest file: what was built from what, and where each expert lies."""

    fingerprint: str
    """Source checkpoint fingerprint (Checkpoint.fingerprint)."""
    stamp: str
    """Checkpoint file sizes + mtimes (Checkpoint.stamp()): a weight edited in place invalidates the cache."""
    settings: dict[str, Any]
    """Quantization settings and shard (QuantSpec.as_dict() + shard)."""
    data_bytes: int
    """Length of the data file."""
    entries: dict[ExpertKey, CacheEntry] = field(default_factory=dict)
    """Every expert of the shard."""

    def to_msgpack(self) -> bytes:
        experts = [{"offset": e.offset, "manifest": e.manifest.to_msgpack()} for e in self.entries.values()]
        return msgpack.packb({"version": CACHE_VERSION, "fingerprint": self.fingerprint, "stamp": self.stamp,
                              "settings": self.settings, "data_bytes": self.data_bytes, "experts": experts})

    @classmethod
    def from_msgpack(cls, data: bytes) -> CacheIndex:
        try:
            d = msgpack.unpackb(data)
            if d["version"] != CACHE_VERSION:
                raise ValueError(f"cache version {d['version']}, this code reads {CACHE_VERSION}")
            entries = {}
            for e in d["experts"]:
                m = ExpertManifest.from_msgpack(e["manifest"])
                entries[m.key] = CacheEntry(int(e["offset"]), m)
            return cls(d["fingerprint"], d["stamp"], d["settings"], int(d["data_bytes"]), entries)
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as e:
            raise ValueError(f"malformed cache manifest: {e}") from e


class ShardCache:
    """The three files of one (quantization fingerprint, shard) pair."""

    def __init__(self, root: Path, quant_fingerprint: str, shard_name: str) -> None:
        self.dir = root / quant_fingerprint
        self.data_path = self.dir / f"{shard_name}.data"
        self.index_path = self.dir / f"{shard_name}.msgpack"
        self.lock_path = self.dir / f"{shard_name}.lock"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock across processes: replicas of one shard on one host build the cache once and the
        others wait, then reuse it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read_index(self, fingerprint: str, stamp: str, settings: dict[str, Any],
                   keys: list[ExpertKey]) -> tuple[CacheIndex | None, str]:
        """The cached index if it matches the checkpoint and settings, else (None, why not)."""
        if not self.index_path.is_file() or not self.data_path.is_file():
            return None, "no cache yet"
        try:
            index = CacheIndex.from_msgpack(self.index_path.read_bytes())
        except (OSError, ValueError) as e:
            return None, f"unreadable cache manifest ({e})"
        if index.fingerprint != fingerprint:
            return None, "checkpoint fingerprint changed"
        if index.stamp != stamp:
            return None, "checkpoint files changed (size or mtime)"
        if index.settings != settings:
            return None, f"settings changed ({index.settings} -> {settings})"
        if sorted(index.entries) != sorted(keys):
            return None, "cached experts differ from the shard's"
        return index, "ok"

    def read_into(self, index: CacheIndex, dest: memoryview, chunk: int = 64 * 2**20) -> Iterator[int]:
        """Reads the data file into ``dest`` (the whole segment), yielding bytes read per step (for a progress
        bar). A short file leaves the rest zero: those experts then fail their checksum and are rebuilt."""
        with open(self.data_path, "rb", buffering=0) as f:
            pos = 0
            while pos < index.data_bytes:
                n = f.readinto(dest[pos:min(pos + chunk, index.data_bytes)])
                if not n:
                    break
                pos += n
                yield n
            if hasattr(os, "posix_fadvise"):  # the bytes now live in shm: don't keep a second copy in page cache
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    @contextmanager
    def writer(self, fingerprint: str, stamp: str, settings: dict[str, Any]) -> Iterator[CacheWriter]:
        """A writer for a new cache; it replaces the old files only when the block completes. Call it holding
        ``locked()``: it also removes temporary files of builders that died."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(f"{self.data_path.stem}.*.tmp*"):  # left by a builder that was killed
            stale.unlink(missing_ok=True)
        tmp_data = self.data_path.with_suffix(f".data.tmp{os.getpid()}")
        try:
            with open(tmp_data, "wb") as f:
                w = CacheWriter(f, CacheIndex(fingerprint, stamp, settings, 0))
                yield w
                f.flush()
                os.fsync(f.fileno())
            self.index_path.unlink(missing_ok=True)  # never a new data file under an old index
            os.replace(tmp_data, self.data_path)
            self.write_index(w.index())
        finally:
            tmp_data.unlink(missing_ok=True)

    def write_index(self, index: CacheIndex) -> None:
        """Atomically (re)writes the manifest file."""
        tmp = self.index_path.with_suffix(f".msgpack.tmp{os.getpid()}")
        tmp.write_bytes(index.to_msgpack())
        os.replace(tmp, self.index_path)

    def patch(self, index: CacheIndex, buf: np.ndarray, manifest: ExpertManifest) -> CacheIndex:
        """Overwrites one expert in place (same length: quantization output size depends only on shapes)."""
        entry = index.entries[manifest.key]
        if manifest.nbytes != entry.manifest.nbytes:
            raise ValueError(f"rebuilt expert {manifest.key} has {manifest.nbytes} bytes, cache slot has "
                             f"{entry.manifest.nbytes}")
        with open(self.data_path, "r+b") as f:
            f.seek(entry.offset)
            f.write(memoryview(buf))
            f.truncate(max(index.data_bytes, f.seek(0, os.SEEK_END)))
            f.flush()
            os.fsync(f.fileno())
        entries = dict(index.entries)
        entries[manifest.key] = CacheEntry(entry.offset, manifest)
        return CacheIndex(index.fingerprint, index.stamp, index.settings, index.data_bytes, entries)


class CacheWriter:
    """Appends experts to a new data file, page aligned, and collects the index."""

    def __init__(self, f: Any, index: CacheIndex) -> None:
        self._f = f
        self._index = index
        self._entries: dict[ExpertKey, CacheEntry] = {}
        self._pos = 0

    def add(self, buf: np.ndarray, manifest: ExpertManifest) -> None:
        pad = page_align(self._pos) - self._pos
        if pad:
            self._f.write(b"\0" * pad)
            self._pos += pad
        self._entries[manifest.key] = CacheEntry(self._pos, manifest)
        self._f.write(memoryview(buf))
        self._pos += manifest.nbytes

    def index(self) -> CacheIndex:
        i = self._index
        return CacheIndex(i.fingerprint, i.stamp, i.settings, self._pos, dict(self._entries))
