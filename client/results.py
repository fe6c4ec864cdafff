"""Typed results of the client calls (plain frozen dataclasses, no generated code)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

STATS_KEYS = (
    "prompt_tokens", "generated_tokens", "ttft_ms", "decode_tokens_per_s",
    "expert_uses", "cache_hits", "cache_misses", "prefetch_issued", "prefetch_used",
    "bytes_fetched", "remote_compute_calls", "gpu_peak_bytes",
)
"""The stats keys every response carries (INTERFACE.md); servers may add more."""

_FLOAT_KEYS = frozenset({"ttft_ms", "decode_tokens_per_s"})
"""Keys of STATS_KEYS that are measurements; the others are counters and come back as ints."""

FINISH_REASONS = ("stop", "length")
"""``stop``: the model emitted EOS; ``length``: ``max_new_tokens`` were generated."""


def normalize_stats(raw: Mapping[str, float]) -> dict[str, float | int]:
    """The wire's ``map<string, double>`` as a dict whose counters are ints (``generated_tokens`` is 12,
    not 12.0); measurements and keys this client does not know stay floats."""
    out: dict[str, float | int] = {}
    for key, value in sorted(raw.items()):
        counter = key in STATS_KEYS and key not in _FLOAT_KEYS and float(value).is_integer()
        out[key] = int(value) if counter else float(value)
    return out


@dataclass(frozen=True)
class StreamChunk:
    """One generated token, as the server decoded it."""

    token_id: int
    """The token id."""
    text: str
    """The text this token adds (may be empty while a multi-byte character is incomplete)."""
    index: int = 0
    """Position among the generated tokens (0 for the first)."""
    finish_reason: str = ""
    """Empty except on the last token when the server sends the reason with it: "stop" or "length"."""


@dataclass(frozen=True)
class GenerateResult:
    """A finished generation."""

    text: str
    """The generated text (the prompt is not repeated)."""
    token_ids: list[int]
    """The generated token ids only (no prompt tokens)."""
    finish_reason: str
    """"stop" (EOS) or "length" (``max_new_tokens`` reached)."""
    stats: dict[str, float | int] = field(default_factory=dict)
    """Per-request stats (``prompt_tokens``, ``generated_tokens``, ``ttft_ms``, ... see STATS_KEYS)."""
