"""Client errors: one ``ClientError`` carrying the gRPC status name, with a subclass per common status."""

from __future__ import annotations


class ClientError(RuntimeError):
    """A failed call. ``code`` is the gRPC status name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``, ...)."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgumentError(ClientError, ValueError):
    """The request was malformed (bad prompt, sampling parameters, lengths)."""

    code = "INVALID_ARGUMENT"


class UnavailableError(ClientError, ConnectionError):
    """The coordinator (or the expert workers behind it) cannot be reached."""

    code = "UNAVAILABLE"


class DeadlineExceededError(ClientError, TimeoutError):
    """The call did not finish within its timeout."""

    code = "DEADLINE_EXCEEDED"


class ResourceExhaustedError(ClientError):
    """The server is at capacity (its request queue is full); retry later."""

    code = "RESOURCE_EXHAUSTED"


class CancelledError(ClientError):
    """The call was cancelled (by this client closing a stream early, or by the server)."""

    code = "CANCELLED"


_BY_CODE: dict[str, type[ClientError]] = {
    cls.code: cls for cls in (InvalidArgumentError, UnavailableError, DeadlineExceededError,
                              ResourceExhaustedError, CancelledError)
}


def error_for(code: str, message: str) -> ClientError:
    """The most specific ``ClientError`` for a status name."""
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else ClientError(message, code)
