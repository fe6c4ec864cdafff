"""``Client``: the Python API for sending prompts to a coordinator (INTERFACE.md "Python client").

    with Client("127.0.0.1:50051", timeout_s=60) as c:
        r = c.generate("Hello", max_new_tokens=32)
        for chunk in c.stream("Hello"):
            print(chunk.text, end="")

Every call takes an optional ``timeout_s`` that overrides the client's default. gRPC failures become
``ClientError`` subclasses whose ``code`` is the status name.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from client import wire
from client.errors import ClientError, DeadlineExceededError, InvalidArgumentError, error_for
from client.results import GenerateResult, StreamChunk, normalize_stats

_UNSET: Any = object()

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
)


def _translate(err: grpc.RpcError) -> ClientError:
    """A gRPC error as the matching ClientError."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_for(code.name if code is not None else "UNKNOWN", details or "")


class TokenStream:
    """The tokens of one streaming generation, iterated as ``StreamChunk``s.

    After the iteration ends, ``finish_reason`` and ``stats`` hold what the server sent last, and
    ``result()`` gives the whole ``GenerateResult``. Leaving the loop early (or ``cancel()``) cancels the call,
    which stops the server's decode."""

    def __init__(self, call: grpc.Call, messages: Iterator[wire.WireToken]) -> None:
        self._call = call
        self._messages = messages
        self._ids: list[int] = []
        self._texts: list[str] = []
        self.finish_reason: str = ""
        """"stop" or "length" once the stream has ended."""
        self.stats: dict[str, float | int] = {}
        """Per-request stats once the stream has ended."""
        self._done = False

    def __iter__(self) -> Iterator[StreamChunk]:
        try:
            for msg in self._messages:
                if msg.finish_reason:
                    self.finish_reason = msg.finish_reason
                if msg.stats:
                    self.stats = normalize_stats(msg.stats)
                if msg.has_token:
                    self._ids.append(msg.token_id)
                    self._texts.append(msg.text)
                    yield StreamChunk(msg.token_id, msg.text, len(self._ids) - 1, msg.finish_reason)
            self._done = True
        except grpc.RpcError as err:
            raise _translate(err) from None
        finally:
            if not self._done:
                self._call.cancel()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        # A stream dropped without being read must not keep the server decoding until the deadline.
        try:
            self.cancel()
        except Exception:  # interpreter shutdown: grpc may already be gone
            pass

    def cancel(self) -> None:
        """Stops the generation (no-op once it has finished)."""
        if not self._done:
            self._call.cancel()

    def result(self) -> GenerateResult:
        """The whole generation: drains the remaining tokens first."""
        for _ in self:
            pass
        return GenerateResult("".join(self._texts), list(self._ids), self.finish_reason, dict(self.stats))


class Client:
    """A connection to one coordinator (``HOST:PORT``). Thread-safe; close it (or use ``with``)."""

    def __init__(self, address: str, timeout_s: float | None = 60.0, *, token: str | None = None,
                 tls_root_cert: str | os.PathLike[str] | None = None) -> None:
        """``timeout_s`` is the default per-call deadline in seconds (None: no deadline). ``token`` is the
        shared secret of a coordinator bound beyond loopback (default: ``$MOE_AUTH_TOKEN``);
        ``tls_root_cert`` a PEM file that turns TLS on."""
        from expert_workers.security import client_channel, load_token  # the servers' own auth policy

        if not isinstance(address, str) or ":" not in address:
            raise InvalidArgumentError(f"address must be HOST:PORT, got {address!r}")
        self.address = address
        self.timeout_s = timeout_s
        root = Path(tls_root_cert) if tls_root_cert is not None else None
        self._channel = client_channel(address, token or load_token(None), root, CHANNEL_OPTIONS)
        self._stubs = wire.Stubs(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r}, timeout_s={self.timeout_s})"

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is _UNSET else timeout_s

    def stream(self, text: str | None = None, *, prompt_token_ids: list[int] | None = None,
               max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, timeout_s: float | None = _UNSET) -> TokenStream:
        """Starts a generation and returns its tokens as they are decoded (a ``TokenStream``).

        Give the prompt as ``text`` or as ``prompt_token_ids`` (not both). ``temperature=0`` is greedy;
        ``seed`` makes sampling reproducible. ``timeout_s`` bounds the whole stream."""
        if (text is None) == (prompt_token_ids is None):
            raise InvalidArgumentError("give the prompt either as text or as prompt_token_ids")
        try:
            request = wire.generate_request(text or "", prompt_token_ids, max_new_tokens, temperature, top_p,
                                            seed)
        except ValueError as err:
            raise InvalidArgumentError(str(err)) from None
        call, messages = wire.generate(self._stubs, request, self._timeout(timeout_s))
        return TokenStream(call, messages)

    def generate(self, text: str | None = None, *, prompt_token_ids: list[int] | None = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, timeout_s: float | None = _UNSET) -> GenerateResult:
        """Generates up to ``max_new_tokens`` tokens and returns them with the text, finish reason and stats.
        Arguments as in ``stream``."""
        return self.stream(text, prompt_token_ids=prompt_token_ids, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed, timeout_s=timeout_s).result()

    def stats(self, timeout_s: float | None = _UNSET) -> dict[str, float | int]:
        """Server-wide stats since the coordinator started (the per-request keys, summed, and more)."""
        return self._unary(wire.stats, self._timeout(timeout_s), normalize_stats)

    def health(self, service: str = "", timeout_s: float | None = _UNSET) -> str:
        """The coordinator's grpc.health.v1 status: "SERVING" or "NOT_SERVING" (e.g. while loading).
        Raises ``UnavailableError`` when nothing answers at the address."""
        return self._unary(lambda stubs, t: wire.health(stubs, service, t), self._timeout(timeout_s))

    def wait_ready(self, timeout_s: float = 120.0, poll_s: float = 0.25) -> None:
        """Blocks until health is SERVING; raises ``DeadlineExceededError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout_s=max(0.1, min(5.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except ClientError as err:
                last = str(err)
            time.sleep(poll_s)
        raise DeadlineExceededError(f"{self.address} not SERVING after {timeout_s}s (last: {last})")

    def _unary(self, fn: Any, timeout_s: float | None, convert: Any = None) -> Any:
        try:
            out = fn(self._stubs, timeout_s)
        except grpc.RpcError as err:
            raise _translate(err) from None
        return convert(out) if convert else out

