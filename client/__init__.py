"""Python client for the MoE coordinator: ``Client``, ``ClientError`` and the typed results."""

from client.client import Client, TokenStream
from client.errors import (CancelledError, ClientError, DeadlineExceededError, InvalidArgumentError,
                           ResourceExhaustedError, UnavailableError)
from client.results import STATS_KEYS, GenerateResult, StreamChunk

__all__ = ["Client", "ClientError", "CancelledError", "DeadlineExceededError", "GenerateResult",
           "InvalidArgumentError", "ResourceExhaustedError", "STATS_KEYS", "StreamChunk", "TokenStream",
           "UnavailableError"]
