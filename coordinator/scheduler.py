"""One worker thread executing requests in arrival order from a bounded queue.

Concurrent clients get independent results because requests never interleave on the model (batching is a
later step); the queue bound turns overload into an immediate QueueFull (RESOURCE_EXHAUSTED) instead of
unbounded latency. Each request streams its TokenEvents through its own handle.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from coordinator.generate import GenerateParams, QueueFull, RequestCancelled, TokenEvent

log = logging.getLogger(__name__)


class ShuttingDown(RuntimeError):
    """The server is stopping (-> UNAVAILABLE)."""


class Engine(Protocol):
    def prepare(self, params: GenerateParams) -> list[int]: ...

    def run(self, params: GenerateParams, prompt_ids: Sequence[int], emit: Callable[[TokenEvent], None],
            cancelled: Callable[[], bool], arrived: float | None = None) -> None: ...


_DONE = object()


class RequestHandle:
    """A submitted request: iterate it for TokenEvents (re-raises the request's error); ``cancel`` stops it."""

    def __init__(self, params: GenerateParams, prompt_ids: list[int]) -> None:
        self.params = params
        self.prompt_ids = prompt_ids
        self.arrived = time.monotonic()
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self.emitted = 0
        """Events emitted so far (tokens, then the final record)."""
        self.emitted_at_cancel: int | None = None
        """``emitted`` when ``cancel`` was first called: the decode must stop within one more step."""

    def cancel(self) -> None:
        if self.emitted_at_cancel is None:
            self.emitted_at_cancel = self.emitted
        self._cancelled.set()

    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: TokenEvent) -> None:
        self.emitted += 1
        self._events.put(event)

    def fail(self, error: BaseException) -> None:
        self._events.put(error)
        self._events.put(_DONE)

    def finish(self) -> None:
        self._events.put(_DONE)

    def __iter__(self) -> Iterator[TokenEvent]:
        while (item := self._events.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]


class Scheduler:
    """Bounded FIFO in front of one engine thread."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._waiting: deque[RequestHandle] = deque()
        self._running: RequestHandle | None = None
        self._cond = threading.Condition()
        self._closed = False
        self.rejected = 0
        self.steps_after_cancel_max = 0
        """Most tokens a cancelled request decoded after its cancel arrived (the engine checks every step: <= 1)."""
        self._thread = threading.Thread(target=self._loop, name="coordinator-engine", daemon=True)
        self._thread.start()

    def submit(self, params: GenerateParams) -> RequestHandle:
        """Validates (InvalidRequest) and enqueues (QueueFull when ``max_queue`` requests already wait)."""
        handle = RequestHandle(params, self.engine.prepare(params))
        with self._cond:
            if self._closed:
                raise ShuttingDown("the coordinator is shutting down")
            if len(self._waiting) >= self.max_queue and (self._running is not None or self._waiting):
                self.rejected += 1
                raise QueueFull(f"request queue full ({self.max_queue} waiting); retry later")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Stops a request: dropped at once if still waiting, else its decode stops at the next step."""
        handle.cancel()
        with self._cond:
            if handle in self._waiting:
                self._waiting.remove(handle)
                handle.fail(RequestCancelled("cancelled while queued"))

    def depth(self) -> int:
        with self._cond:
            return len(self._waiting) + (self._running is not None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                handle = self._running = self._waiting.popleft()
            try:
                self.engine.run(handle.params, handle.prompt_ids, handle.emit, handle.cancelled, handle.arrived)
            except BaseException as e:  # noqa: BLE001 - reported to the client; the server keeps serving
                if isinstance(e, RequestCancelled) and handle.emitted_at_cancel is not None:
                    overrun = handle.emitted - handle.emitted_at_cancel
                    self.steps_after_cancel_max = max(self.steps_after_cancel_max, overrun)
                else:
                    log.warning("request failed: %s: %s", type(e).__name__, e)
                # Without the engine's frames: they hold the request's KV cache, which must go now, not when
                # the client's thread drops the error (or the cycle collector runs).
                handle.fail(e.with_traceback(None))
            else:
                handle.finish()
            finally:
                with self._cond:
                    self._running = None

    def close(self, timeout: float = 10.0) -> None:
        """Refuses new requests, fails the waiting ones, cancels the running one and joins the thread."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            if self._running is not None:
                self._running.cancel()
            self._cond.notify_all()
        for handle in waiting:
            handle.fail(ShuttingDown("the coordinator is shutting down"))
        self._thread.join(timeout)
