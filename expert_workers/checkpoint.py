"""Reads one shard's expert weights from a local Hugging Face Mixtral checkpoint directory.

Two key layouts are understood, per layer (a checkpoint may even mix them):

    Mixtral as shipped:   model.layers.L.block_sparse_moe.experts.E.w1.weight   [I, H]   (gate)
                          model.layers.L.block_sparse_moe.experts.E.w3.weight   [I, H]   (up)
                          model.layers.L.block_sparse_moe.experts.E.w2.weight   [H, I]   (down)
    transformers 5 fused: model.layers.L.mlp.experts.gate_up_proj               [E, 2I, H]  rows [0, I) = w1
                          model.layers.L.mlp.experts.down_proj                  [E, H, I]

Tensors are read with ``safe_open`` one expert at a time (``get_slice`` for the fused layout), so a worker
never holds more than one expert of the source checkpoint in RAM.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import xxhash

from expert_workers.format import ExpertKey, ExpertLayout

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint directory is not a usable Mixtral checkpoint (the message names what is wrong)."""


def _mixtral_key(layer: int, expert: int, name: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}.weight"


def _fused_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{name}"


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json; expected a Hugging Face checkpoint directory")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if config.get("model_type") != "mixtral":
        raise CheckpointError(f"{cfg_path}: model_type is {config.get('model_type')!r}, expected 'mixtral' "
                              "(only Mixtral-architecture checkpoints are supported)")
    for field in ("num_hidden_layers", "num_local_experts", "hidden_size", "intermediate_size"):
        if not isinstance(config.get(field), int) or config[field] <= 0:
            raise CheckpointError(f"{cfg_path}: {field} is {config.get(field)!r}, expected a positive integer")
    return config


def _safetensors_header(file: Path) -> bytes:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets): cheap to read."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 2**20:
            raise CheckpointError(f"{file} has a {n}-byte header: not a safetensors file")
        return f.read(n)


class Checkpoint:
    """A Mixtral checkpoint directory: its expert layout, where each tensor lives, and a fingerprint.

    Construction reads only config.json, the index and the safetensors headers; ``read_expert`` /
    ``iter_experts`` read expert weights on demand, in the checkpoint's dtype.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        self.config = _read_config(self.path)
        c = self.config
        self.layout = ExpertLayout(num_layers=c["num_hidden_layers"], num_experts=c["num_local_experts"],
                                   hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                                   top_k=int(c.get("num_experts_per_tok", 2)))
        self.weight_map = self._weight_map()
        self.files = sorted(set(self.weight_map.values()))
        self.fingerprint = self._fingerprint()

    def _weight_map(self) -> dict[str, str]:
        """Tensor name -> safetensors file name, from the index or from the single file's header."""
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is malformed ({e}); expected a 'weight_map' object") from e
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} names files that do not exist: {', '.join(missing)}")
            return dict(weight_map)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path} has neither {INDEX_FILE} nor any *.safetensors file")
        if len(files) > 1 and not (self.path / SINGLE_FILE).is_file():
            raise CheckpointError(f"{self.path} has {len(files)} safetensors files but no {INDEX_FILE}")
        single = self.path / SINGLE_FILE if (self.path / SINGLE_FILE).is_file() else files[0]
        names = json.loads(_safetensors_header(single))
        return {n: single.name for n in names if n != "__metadata__"}

    def _fingerprint(self) -> str:
        """xxh3_128 over config.json, the index and each file's name, size and safetensors header (names,
        dtypes, shapes, offsets). Stable when a checkpoint is copied to another host (no mtimes), so workers on
        different hosts agree; ``stamp()`` adds the mtimes for local cache invalidation."""
        h = xxhash.xxh3_128()
        h.update((self.path / "config.json").read_bytes())
        if (self.path / INDEX_FILE).is_file():
            h.update((self.path / INDEX_FILE).read_bytes())
        for name in self.files:
            file = self.path / name
            h.update(f"{name}|{file.stat().st_size}|".encode())
            h.update(_safetensors_header(file))
        return h.hexdigest()

    def stamp(self) -> str:
        """Sizes and mtimes of the files the experts come from: a weight edited in place (same shapes, so the
        same fingerprint) still changes this, and a cache built from the old weights is rebuilt."""
        parts = [f"{n}:{(s := (self.path / n).stat()).st_size}:{s.st_mtime_ns}" for n in ["config.json", *self.files]]
        return xxhash.xxh3_64_hexdigest("|".join(parts).encode())

    def _check_key(self, key: ExpertKey) -> None:
        if not (0 <= key.layer < self.layout.num_layers and 0 <= key.expert < self.layout.num_experts):
            raise KeyError(f"expert {key} is outside the model ({self.layout.num_layers} layers x "
                           f"{self.layout.num_experts} experts)")

    def is_fused(self, layer: int) -> bool:
        """Whether layer ``layer`` stores its experts in transformers 5's fused layout."""
        return _fused_key(layer, "gate_up_proj") in self.weight_map

    def _tensor_names(self, key: ExpertKey) -> list[str]:
        if self.is_fused(key.layer):
            names = [_fused_key(key.layer, "gate_up_proj"), _fused_key(key.layer, "down_proj")]
        else:
            names = [_mixtral_key(key.layer, key.expert, m) for m in ("w1", "w3", "w2")]
        for n in names:
            if n not in self.weight_map:
                raise CheckpointError(f"{self.path}: tensor {n!r} for expert {key} is missing from the checkpoint")
        return names

    def read_expert(self, key: ExpertKey) -> dict[str, torch.Tensor]:
        """``{"w1": [I, H], "w3": [I, H], "w2": [H, I]}`` of one expert, contiguous, checkpoint dtype."""
        return next(iter(self.iter_experts([key])))[1]

    def iter_experts(self, keys: Iterable[ExpertKey]) -> Iterator[tuple[ExpertKey, dict[str, torch.Tensor]]]:
        """Yields ``(key, weights)`` for each key in order, keeping each safetensors file open across the
        experts that use it (opening a file parses its header)."""
        from safetensors import safe_open

        handles: dict[str, Any] = {}
        try:
            for key in keys:
                self._check_key(key)
                names = self._tensor_names(key)
                for n in names:
                    file = self.weight_map[n]
                    if file not in handles:
                        handles[file] = safe_open(str(self.path / file), framework="pt", device="cpu")
                slices = {n: handles[self.weight_map[n]].get_slice(n) for n in names}
                yield key, self._expert_from(key, slices)
        finally:
            handles.clear()  # safe_open handles close (unmap) when dropped

    def _expert_from(self, key: ExpertKey, slices: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Takes one expert out of its tensor slices, checking every shape."""
        L, H, I, E = key.layer, self.layout.hidden_size, self.layout.intermediate_size, self.layout.num_experts
        if self.is_fused(L):
            gate_up, down = _fused_key(L, "gate_up_proj"), _fused_key(L, "down_proj")
            self._check_shape(gate_up, slices[gate_up].get_shape(), [E, 2 * I, H])
            self._check_shape(down, slices[down].get_shape(), [E, H, I])
            # get_slice reads only this expert's rows from the mmapped file, never the whole [E, ...] tensor
            gu = slices[gate_up][key.expert:key.expert + 1][0]
            out = {"w1": gu[:I], "w3": gu[I:], "w2": slices[down][key.expert:key.expert + 1][0]}
        else:
            expected = {"w1": [I, H], "w3": [I, H], "w2": [H, I]}
            out = {}
            for m, shape in expected.items():
                name = _mixtral_key(L, key.expert, m)
                self._check_shape(name, slices[name].get_shape(), shape)
                out[m] = slices[name][:]
        return {m: t.contiguous() for m, t in out.items()}

    def _check_shape(self, name: str, shape: list[int], expected: list[int]) -> None:
        if list(shape) != expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(shape)}, expected {expected} "
                                  "from config.json")


def open_checkpoint(model: str | os.PathLike[str]) -> Checkpoint:
    """A Checkpoint for ``--model``: a directory, or an embedded model name resolved by modelzoo."""
    from modelzoo import resolve_model

    return Checkpoint(resolve_model(model))
