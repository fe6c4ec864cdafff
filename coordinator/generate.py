"""Request types, validation, token selection and incremental detokenization.

Nothing here knows about gRPC (``coordinator.wire`` converts messages) or about experts.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Collection, Sequence
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
    """Greedy (temperature 0) or temperature + top-p sampling, seeded: one uniform per token from a private
    CPU generator, so a seed gives the same tokens on any device and whatever else runs concurrently.

    ``pick`` selects on the logits' own device and never waits for it, so a GPU decoder can feed the token
    to its next step before the host has read it. Cheap on purpose: the next decode step waits for it. One
    uniform draw against the cumulative distribution (inverse CDF) replaces ``torch.multinomial`` (~1.5-6 ms
    per token over 32k float64 probabilities on the CPU), and top-p on the CPU sorts only the top
    ``NUCLEUS_FIRST`` (more when their mass falls short) instead of the whole vocabulary (~15 ms)."""

    NUCLEUS_FIRST = 64
    UNIFORMS = 256  # uniforms drawn (and sent to the device) at a time; the stream is the same as one by one

    def __init__(self, temperature: float, top_p: float, seed: int | None) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        self._uniforms: torch.Tensor | None = None  # the current block, on the device of the last pick
        self._host_blocks: list[torch.Tensor] = []  # pinned sources of in-flight uploads, kept alive
        self._used = 0

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] float32 -> a token id (waits for the device)."""
        return int(self.pick(logits))

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [V] float32 -> the token id as a [1] int64 tensor on the same device, without a host sync."""
        if self.temperature == 0:
            return torch.argmax(logits).view(1)
        # float64, shifted first: a tiny temperature (1e-320, 0 in float32) would make logits / T inf - inf = nan
        logits = logits.double()
        probs = torch.softmax((logits - logits.max()) / self.temperature, dim=-1)
        if self.top_p < 1:
            probs = self._nucleus(probs)
        return self._draw(probs, self._uniform(probs.device))

    def _nucleus(self, probs: torch.Tensor) -> torch.Tensor:
        """probs outside the smallest most-likely prefix whose mass reaches top_p set to 0 (not renormalized:
        ``_draw`` scales by the total). A device sorts the whole vocabulary (no sync); the CPU grows a top-k."""
        k = probs.numel() if probs.is_cuda else min(self.NUCLEUS_FIRST, probs.numel())
        while True:
            top, order = torch.topk(probs, k)  # descending
            cum = torch.cumsum(top, dim=0)
            if k == probs.numel() or cum[-1] >= self.top_p:  # the prefix ends inside these k
                break
            k = min(8 * k, probs.numel())
        keep = (cum - top) < self.top_p  # mass before each token still short of top_p
        return torch.zeros_like(probs).scatter_(0, order, torch.where(keep, top, 0.0))

    def _draw(self, probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A token with probability probs[i] / sum(probs): the first i whose cumulative mass exceeds u·total;
        u·total rounded up to the total (p ~ 2**-53) gives the last token of nonzero probability."""
        cdf = torch.cumsum(probs, dim=0)
        i = torch.searchsorted(cdf, (u * cdf[-1]).view(1), right=True)
        inside = i.clamp(max=probs.numel() - 1)
        index = torch.arange(probs.numel(), device=probs.device)
        last = torch.where(probs > 0, index, -1).max().view(1)
        return torch.where((i < probs.numel()) & (probs[inside] > 0), inside, last)

    def _uniform(self, device: torch.device) -> torch.Tensor:
        """The next uniform of the seeded stream, as a 0-d float64 on ``device`` (uploaded a block at a time
        from pinned memory: a pageable upload may wait for the device)."""
        if self._uniforms is None or self._used == self._uniforms.numel() or self._uniforms.device != device:
            block = torch.rand(self.UNIFORMS, generator=self.generator, dtype=torch.float64)
            if device.type == "cuda":
                block = block.pin_memory()
                self._host_blocks = [*self._host_blocks[-1:], block]  # the previous upload may still be in flight
            self._uniforms, self._used = block.to(device, non_blocking=True), 0
        self._used += 1
        return self._uniforms[self._used - 1]


class TokenCopy:
    """A token picked on the device, on its way to the host: copied to pinned memory behind the step that
    picked it, so the host reads it later without draining the device's queue."""

    def __init__(self, token: torch.Tensor) -> None:
        self.device_token = token
        """[1] int64 on the device: the next step's input."""
        self._event: torch.cuda.Event | None = None
        if token.is_cuda:
            self._host = torch.empty(1, dtype=torch.long, pin_memory=True)
            self._host.copy_(token, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(token.device))
        else:
            self._host = token

    def result(self) -> int:
        """The token id (waits for the copy)."""
        if self._event is not None:
            self._event.synchronize()
        return int(self._host[0])


class RequestOutput:
    """The host side of one request's tokens: reads each picked token, detokenizes and emits it, and decides
    when to stop. A cancel is noted here and raised by ``check_cancelled`` (``deliver`` may run in the middle
    of a decode step, which must not be abandoned half-queued)."""

    def __init__(self, params: GenerateParams, detok: Detokenizer, emit: Callable[[TokenEvent], None],
                 cancelled: Callable[[], bool], eos: Collection[int]) -> None:
        self.params, self.detok, self.emit, self.cancelled, self.eos = params, detok, emit, cancelled, eos
        self.generated: list[int] = []
        self.finish = ""
        """"" while generating, then "stop" (EOS) or "length"."""
        self.first_at = 0.0
        """When the first token was emitted (time.monotonic)."""
        self.cancel_seen = False

    def deliver(self, token: TokenCopy) -> None:
        t = token.result()
        self.generated.append(t)
        self.first_at = self.first_at or time.monotonic()
        self.finish = ("stop" if t in self.eos else
                       "length" if len(self.generated) >= self.params.max_new_tokens else "")
        self.emit(TokenEvent(t, self.detok.add(t)))
        self.cancel_seen = not self.finish and self.cancelled()

    def check_cancelled(self) -> None:
        if self.cancel_seen:
            raise RequestCancelled(f"cancelled after {len(self.generated)} tokens")


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
