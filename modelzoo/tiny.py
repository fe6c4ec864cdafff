"""``tiny-random``: a small deterministic Mixtral checkpoint with a byte-level tokenizer, for tests."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@dataclass(frozen=True)
class TinySpec:
    """Shape and seed of a tiny random Mixtral. The defaults are ``tiny-random``."""

    layers: int = 4
    """Decoder layers."""
    experts: int = 8
    """Experts per layer."""
    top_k: int = 2
    """Experts per token."""
    hidden: int = 64
    """Hidden size (a multiple of 64 so 2-bit g64 quantization applies)."""
    intermediate: int = 128
    """Expert FFN size."""
    heads: int = 4
    """Attention heads."""
    kv_heads: int = 2
    """Key/value heads."""
    max_positions: int = 256
    """Longest sequence."""
    seed: int = 0
    """torch seed for the weights."""
    dtype: str = "float32"
    """Stored dtype."""
    fused_experts: bool = False
    """Save transformers 5's fused layout (mlp.experts.gate_up_proj) instead of Mixtral's w1/w2/w3."""
    max_shard_size: str = "10GB"
    """Safetensors shard size; small values give several files plus model.safetensors.index.json."""
    vocab: int | None = None
    """Rows of the embedding and lm_head; None = the tokenizer's 259. Real checkpoints pad theirs past the
    tokenizer (Mixtral's 32000), and a 4-bit lm_head packs only an even count. At least the tokenizer's."""


def _byte_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer with no merges: every byte is a token, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab |= {ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)


def vocab_size() -> int:
    """Special tokens + 256 bytes: every id the model can emit decodes to text."""
    return len(SPECIAL_TOKENS) + 256


def write_tiny_random(out: Path, spec: TinySpec) -> Path:
    """Writes a tiny random Mixtral checkpoint (config, safetensors, tokenizer) into ``out``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    if spec.vocab is not None and spec.vocab < vocab_size():
        raise ValueError(f"vocab {spec.vocab} is smaller than the tokenizer's {vocab_size()} tokens")
    config = MixtralConfig(
        vocab_size=spec.vocab or vocab_size(), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        num_local_experts=spec.experts, num_experts_per_tok=spec.top_k,
        max_position_embeddings=spec.max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)
    torch.manual_seed(spec.seed)
    model = MixtralForCausalLM(config).to(getattr(torch, spec.dtype))
    with torch.no_grad():  # default init (std 0.02) makes near-uniform logits; widen so tokens differ
        for p in model.parameters():
            p.normal_(0.0, 0.08 if p.dim() > 1 else 0.02).add_(1.0 if p.dim() == 1 else 0.0)
    # transformers 5 converts back to Mixtral's shipped key layout on save by default
    # (save_original_format=True); the fused layout needs it off. Older versions lack the flag and save fused.
    try:
        model.save_pretrained(out, max_shard_size=spec.max_shard_size, save_original_format=not spec.fused_experts)
    except TypeError:
        model.save_pretrained(out, max_shard_size=spec.max_shard_size)
    if not spec.fused_experts:
        unfuse_experts(out)  # a no-op where save already wrote w1/w2/w3
    _byte_tokenizer(out)
    return out


def unfuse_experts(ckpt: Path) -> None:
    """Rewrites transformers 5's fused expert tensors into the layout Mixtral ships
    (``block_sparse_moe.experts.E.{w1,w2,w3}.weight``), keeping the shard files and index consistent."""
    from safetensors.torch import load_file, save_file

    index_path = ckpt / "model.safetensors.index.json"
    files = sorted(ckpt.glob("*.safetensors"))
    weight_map: dict[str, str] = {}
    for f in files:
        tensors = load_file(f)
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if name.endswith("mlp.experts.gate_up_proj"):
                prefix = name.removesuffix("mlp.experts.gate_up_proj") + "block_sparse_moe.experts"
                inter = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{prefix}.{e}.w1.weight"] = t[e, :inter].contiguous()
                    out[f"{prefix}.{e}.w3.weight"] = t[e, inter:].contiguous()
            elif name.endswith("mlp.experts.down_proj"):
                prefix = name.removesuffix("mlp.experts.down_proj") + "block_sparse_moe.experts"
                for e in range(t.shape[0]):
                    out[f"{prefix}.{e}.w2.weight"] = t[e].contiguous()
            elif ".mlp.gate." in name:
                out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
            else:
                out[name] = t
        save_file(out, f, metadata={"format": "pt"})
        weight_map |= {n: f.name for n in out}
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index_path.write_text(json.dumps(index, indent=2))


def build_tiny_random(out: Path, spec: TinySpec) -> Path:
    """Builds the checkpoint once (atomically: a temp dir renamed into place) and returns its path."""
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        write_tiny_random(tmp, spec)
        try:
            os.rename(tmp, out)
        except OSError:  # another process built it first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
