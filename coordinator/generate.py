"""Request types, validation, token selection and incremental detokenization.

Nothing here knows about gRPC (``coordinator.wire`` converts messages) or about experts.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_MAX_NEW_TOKENS = 32


class InvalidRequest(ValueError):
    """The request's parameters are unusable (-> INVALID_ARGUMENT); the message says which and why."""


class QueueFull(RuntimeError):
    """The request queue is at capacity (-> RESOURCE_EXHAUSTED)."""


class RequestCancelled(RuntimeError):
    """The client went away; its decode stopped (-> CANCELLED)."""


@dataclass(frozen=True)
class GenerateParams:
    """One generation request, as the core sees it."""

    prompt: str = ""
    """Text; ignored when ``prompt_token_ids`` is given."""
    prompt_token_ids: tuple[int, ...] = ()
    """Token ids of the prompt."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    """Tokens to generate at most (>= 1)."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    seed: int | None = None
    """Sampling seed; None = a fresh random one."""


@dataclass(frozen=True)
class TokenEvent:
    """One streamed item: a token, or the final record (``token_id`` None) with finish reason and stats."""

    token_id: int | None
    """The generated token, None for the final record."""
    text: str = ""
    """Text this event adds to the output (incremental detokenization)."""
    finish_reason: str = ""
    """"" while generating; "stop" (EOS) or "length" on the final record."""
    stats: dict[str, float] = field(default_factory=dict)
    """Per-request stats, final record only."""


def validate(params: GenerateParams, prompt_ids: Sequence[int], vocab_size: int, max_positions: int) -> None:
    """Raises InvalidRequest naming the first bad parameter."""
    if not prompt_ids:
        raise InvalidRequest("prompt is empty: give a non-empty prompt or prompt_token_ids")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"prompt_token_ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    if params.max_new_tokens <= 0:
        raise InvalidRequest(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if len(prompt_ids) + params.max_new_tokens > max_positions:
        raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                             f"exceeds the model's {max_positions} positions")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidRequest(f"temperature must be finite and >= 0, got {params.temperature}")
    if not math.isfinite(params.top_p) or not 0 < params.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {params.top_p}")


class Sampler:
    """Greedy (temperature 0) or temperature + top-p sampling with a private seeded CPU generator, so a
    seed gives the same tokens on any device and whatever else runs concurrently.

    Cheap on purpose: the next decode step waits for it. One uniform draw against the cumulative
    distribution (inverse CDF) replaces ``torch.multinomial``, which took ~1.5-6 ms per token over 32k float64
    probabilities, and top-p sorts only the top ``NUCLEUS_FIRST`` (more when their mass falls short) instead of
    the whole vocabulary (~15 ms)."""

    NUCLEUS_FIRST = 64

    def __init__(self, temperature: float, top_p: float, seed: int | None) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] float32 -> a token id."""
        if self.temperature == 0:
            return int(torch.argmax(logits))
        # float64, shifted first: a tiny temperature (1e-320, 0 in float32) would make logits / T inf - inf = nan
        logits = logits.double().cpu()
        probs = torch.softmax((logits - logits.max()) / self.temperature, dim=-1)
        if self.top_p < 1:
            probs = self._nucleus(probs)
        return self._draw(probs)

    def _nucleus(self, probs: torch.Tensor) -> torch.Tensor:
        """probs outside the smallest most-likely prefix whose mass reaches top_p set to 0 (not renormalized:
        ``_draw`` scales by the total)."""
        k = min(self.NUCLEUS_FIRST, probs.numel())
        while True:
            top, order = torch.topk(probs, k)  # descending
            cum = torch.cumsum(top, dim=0)
            if cum[-1] >= self.top_p or k == probs.numel():  # the prefix ends inside these k
                break
            k = min(8 * k, probs.numel())
        keep = (cum - top) < self.top_p  # mass before each token still short of top_p
        return torch.zeros_like(probs).scatter_(0, order[keep], top[keep])

    def _draw(self, probs: torch.Tensor) -> int:
        """A token with probability probs[i] / sum(probs): the first i whose cumulative mass exceeds u·total."""
        cdf = torch.cumsum(probs, dim=0)
        u = torch.rand(1, generator=self.generator, dtype=torch.float64)
        i = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
        if i < probs.numel() and probs[i] > 0:
            return i
        return int(torch.nonzero(probs).max())  # u·total rounded up to the total (p ~ 2**-53): the last token


class Detokenizer:
    """Incremental detokenization (the TGI/vLLM prefix/read-offset scheme): each token yields the text it
    completes; bytes of an unfinished UTF-8 character are held back until it is complete. A few prompt
    tokens seed the window so tokenizers that drop a leading space decode the first token right."""

    CONTEXT = 5

    def __init__(self, tokenizer: Any | None, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def add(self, token_id: int) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end of generation)."""
        if self.tokenizer is None or self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]
